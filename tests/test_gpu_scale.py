"""GPU only (skipped without CUDA; CI has none): a ~100M-parameter Qwen2 model built here, trained by the r1_zero stage
under DeepSpeed ZeRO-3 on every local GPU through the launcher, and the vLLM rollout backend (skipped without vLLM)
generating for the GRPO trainer with its weights synced after each update.

Run on a GPU machine with `pytest -q -s tests/test_gpu_scale.py`; it prints what it measured (seconds, memory)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (the gpu extra)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    """A ~100M-parameter Qwen2 model (random weights) with the tiny recipe's tokenizer, saved as a model directory."""
    from stages.core.tasks import clean_trace, make_problems
    from stages.core.tokenizer import train_tokenizer

    tok = train_tokenizer([f"User: {p.question}\nAssistant:{clean_trace(p)}" for p in make_problems("addition", 500, 0)],
                          vocab_size=512)
    model = tiny_model(tok, hidden_size=768, num_hidden_layers=14, num_attention_heads=12, num_key_value_heads=4,
                       intermediate_size=2304, max_position_embeddings=512)
    n = sum(p.numel() for p in model.parameters())
    assert n > 100e6, n
    out = tmp_path_factory.mktemp("gpu_model") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"built a {n / 1e6:.0f}M-parameter model")
    return out


def grpo_values(**over) -> dict:
    return {"prompts_per_step": 16, "num_generations": 8, "iterations": 2, "steps_per_iteration": 3, "beta": 0.04,
            "learning_rate": 1e-5, "max_prompt_length": 64, "max_completion_length": 64, "log_every": 1,
            "rollout_seeding": "prompt", **over}


def test_zero3_grpo_stage_on_all_local_gpus(model_dir, tmp_path):
    import mlflow

    from flows.launch import LaunchSpec, launch_stage
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    gpus = torch.cuda.device_count()
    recipe = load_recipe("tiny", {**MINI, "device": "cuda", "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
                                  "output_dir": str(tmp_path / "runs"), "r1_zero.grpo": grpo_values(),
                                  "cluster.launcher": "torchrun", "cluster.gpus_per_node": gpus,
                                  "cluster.deepspeed_config": "infra/deepspeed/zero3.json", "cluster.timeout": 1800})
    t0 = time.perf_counter()
    out = launch_stage("r1_zero", recipe, None, None, LaunchSpec.from_cluster(recipe.cluster),
                       inputs={"model": str(model_dir)}, log=lambda line: None)
    seconds = time.perf_counter() - t0
    client = mlflow.MlflowClient(recipe.tracking.uri)
    steps = client.get_metric_history(out["run_id"], "step_time")
    assert len(steps) == 6 and client.get_run(out["run_id"]).info.status == "FINISHED"
    print(f"r1_zero, ZeRO-3 on {gpus} GPU(s): launch {seconds:.0f} s, step times "
          f"{[round(m.value, 2) for m in sorted(steps, key=lambda m: m.step)]}")


@needs_vllm
def test_vllm_backend_generates_and_follows_the_policy(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.config import GRPOConfig, VLLMConfig
    from grpo.trainer import GRPOTrainer
    from stages.core.tasks import make_problems

    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).cuda()
    data = [{"prompt": f"User: {p.question}\nAssistant:"} for p in make_problems("addition", 64, 1)]
    cfg = GRPOConfig(**grpo_values(iterations=1, steps_per_iteration=3, learning_rate=1e-4), rollout_backend="vllm",
                     vllm=VLLMConfig(gpu_memory_utilization=0.3, enforce_eager=True, dtype="float32"))

    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(policy, tok, cfg, data, [("len", length, 1.0)], progress=False)
    t0 = time.perf_counter()
    history = trainer.train()
    print(f"vLLM rollouts, 3 GRPO steps: {time.perf_counter() - t0:.1f} s, generation tokens/s "
          f"{[round(h['tokens_per_s']) for h in history]}, peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert trainer.backend.synced_version == 2  # synced before the rollout of step 3 (after 2 updates)
    # vLLM's greedy completion equals the (updated) policy's greedy completion under HF generate
    from grpo.rollout import HFGenerateBackend, SamplingParams

    greedy = SamplingParams(max_new_tokens=16, do_sample=False)
    trainer.backend.sync_weights()
    a = trainer.backend.generate([data[0]["prompt"]], 1, greedy).completions
    b = HFGenerateBackend(policy, tok).generate([data[0]["prompt"]], 1, greedy).completions
    assert a == b
