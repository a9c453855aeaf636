"""Preflight's training-memory estimate (stages/core/memory.py), against hand computation, and its refusal."""

from __future__ import annotations

import json
import logging

import pytest

from stages.core import memory
from stages.core.preflight import check_memory

# V = 1000, h = 64, L = 2, 4 heads of which 2 KV heads (kv width 32), I = 128, untied embeddings
CONFIG = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": False,
          "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 256}
# 1000·64·2 embeddings + 2·(2·64² + 2·64·32 + 3·64·128) layers + 5·64 norms
P = 128_000 + 2 * (8192 + 4096 + 24_576) + 320


def test_parameter_count_matches_the_model_it_describes():
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    assert memory.parameter_count(CONFIG) == P == 202_048 == sum(p.numel() for p in model.parameters())


def test_estimate_by_hand():
    # bf16: weights 2 + grads 2 + Adam 8 + reference 2 bytes per parameter
    e = memory.estimate(CONFIG, "bf16", micro_batch=4, tokens=100, gradient_checkpointing=False, logits_positions=50,
                        reference_model=True)
    assert e.model_states == 14 * P
    assert e.activations == 4 * 100 * 2 * 17 * 64 * 2  # m·T·L·17·h·a
    assert e.logits == 50 * 1000 * 8
    ckpt = memory.estimate(CONFIG, "bf16", 4, 100, True, 50)
    assert ckpt.activations == 4 * 100 * 64 * 2 * (2 + 17) and ckpt.model_states == 12 * P
    # fp32 over 4 processes: ZeRO-2 shards the Adam moments and the gradients, ZeRO-3 the weights too
    assert memory.estimate(CONFIG, "fp32", 1, 1, False, 1, zero_stage=2, world=4).model_states == (4 + 1 + 2) * P
    assert memory.estimate(CONFIG, "fp32", 1, 1, False, 1, zero_stage=3, world=4).model_states == (1 + 1 + 2) * P
    assert memory.estimate(CONFIG, "fp16", 1, 1, False, 1).model_states == 16 * P  # fp16 keeps fp32 weights


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return str(tmp_path)


def _recipe(tmp_path, **over):
    from stages.core.recipe import load_recipe

    return load_recipe("tiny", {"r1_zero.grpo.prompts_per_step": 4, "r1_zero.grpo.num_generations": 2,
                                "r1_zero.grpo.max_prompt_length": 50, "r1_zero.grpo.max_completion_length": 50,
                                "r1_zero.grpo.precision": "bf16", "r1_zero.grpo.logprob_chunk_size": 50,
                                "output_dir": str(tmp_path / "runs"), **over})


# r1_zero above: micro-batch 8 (4 prompts × 2), 100 tokens, β > 0 (a reference model), a 50-position logits chunk
R1_ZERO_BYTES = 14 * P + 8 * 100 * 2 * 17 * 64 * 2 + 50 * 1000 * 8


def test_preflight_refuses_a_stage_that_cannot_fit(monkeypatch, model_dir, tmp_path):
    assert R1_ZERO_BYTES == 6_710_272  # 6.4 MiB
    monkeypatch.setattr(memory, "machine_memory", lambda device: (6_000_000, "GPU memory of a test GPU"))
    (problem,) = check_memory(_recipe(tmp_path), ["r1_zero"], {"model": model_dir})
    assert problem == (
        "r1_zero: estimated training memory 6.4 MiB per process: model states 2.7 MiB (202,048 parameters, ZeRO stage "
        "0 over 1 process(es)), activations 3.3 MiB (micro-batch 8 × 100 tokens), logits 0.4 MiB; more than the 5.7 MiB "
        "of GPU memory of a test GPU: lower r1_zero.grpo.micro_batch_size, set r1_zero.grpo.gradient_checkpointing: "
        "true, or shard the model states with DeepSpeed ZeRO stage 2/3 over more processes (cluster.deepspeed_config, "
        "infra/deepspeed/)")


def test_preflight_warns_when_tight_and_passes_when_it_fits(monkeypatch, model_dir, tmp_path, caplog):
    monkeypatch.setattr(memory, "machine_memory", lambda device: (R1_ZERO_BYTES / 0.9, "available RAM"))
    with caplog.at_level(logging.WARNING, "stages.core.preflight"):
        assert check_memory(_recipe(tmp_path), ["r1_zero"], {"model": model_dir}) == []
    assert "r1_zero: estimated training memory 6.4 MiB" in caplog.text and "90% of the" in caplog.text
    caplog.clear()
    monkeypatch.setattr(memory, "machine_memory", lambda device: (R1_ZERO_BYTES * 2, "available RAM"))
    with caplog.at_level(logging.WARNING, "stages.core.preflight"):
        assert check_memory(_recipe(tmp_path), ["r1_zero"], {"model": model_dir}) == []
    assert caplog.text == ""
    # the knob it names helps: micro-batches of 2 fit where 8 did not
    monkeypatch.setattr(memory, "machine_memory", lambda device: (6_000_000, "GPU memory of a test GPU"))
    assert check_memory(_recipe(tmp_path, **{"r1_zero.grpo.micro_batch_size": 2}), ["r1_zero"], {"model": model_dir}) == []


def test_the_tiny_preset_fits_this_machine(tmp_path):
    from stages.core.order import ORDER

    assert check_memory(_recipe(tmp_path), list(ORDER), {}) == []
