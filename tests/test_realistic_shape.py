"""A GRPO step and an SFT step at a real shape on the CPU, under a memory bound computed from that shape.

The model has Qwen2.5-0.5B's vocabulary (151,936), head layout (14 query / 2 key-value heads of 64), RoPE theta and
tied embeddings at reduced width and depth (`benchmarks/grpo_memory.py: realistic_model`), in bf16, with gradient
checkpointing and micro-batches of one row, on 2k-token completions. Each step runs in its own process, which
reports how far its peak resident set rose above the set it had once the model was built. The bound allows the
training state (gradients, AdamW's two states), one chunk of vocabulary logits and one layer's activations; a
regression that keeps a row's full (L x V) fp32 logits (1.2 GB at 2k tokens) or per-head (L x L) attention scores
(14 x 2k x 2k x 4 B = 235 MB per layer) exceeds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS = 64, 2
LONG, SHORT, PROMPT = 2048, 128, 32  # a group of two completions (the long one sets the peak); prompt tokens
GRPO_CHUNK = 64  # logprob_chunk_size: positions per chunk of the vocabulary projection
MB = 2**20
PAD = 151_643  # benchmarks/grpo_memory.py's EOS and padding id


def param_count(cfg) -> int:
    nh, nkv, hd, H, inter = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                             cfg.intermediate_size)
    attention = H * (nh + 2 * nkv) * hd + (nh + 2 * nkv) * hd + nh * hd * H  # q|k|v with bias, o
    layer = attention + 3 * H * inter + 2 * H
    return cfg.vocab_size * H + cfg.num_hidden_layers * layer + H  # tied embeddings: one V x H matrix


def bound_mb(cfg, positions_per_chunk: int, tokens: int) -> float:
    """What one micro-batch of `tokens` tokens may add to the built bf16 model: gradients and AdamW's exp_avg and
    exp_avg_sq (bf16, 2 B each per weight); one chunk of logits, counted 6 times in fp32 (logits, their fp32 copy,
    log-softmax, gradient, softmax of the recompute); one layer's activations in the checkpointed recompute and its
    backward, every per-token vector of the layer counted 4 times in fp32; the additive attention mask of the pass
    (L x S, bf16: the one O(L^2) tensor, shared by the heads and layers); 200 MB for the interpreter, the autograd
    graph, thread pools and the allocator's slack."""
    nh, nkv, hd, H, inter = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                             cfg.intermediate_size)
    state = 3 * 2 * param_count(cfg)
    logits = 6 * 4 * positions_per_chunk * cfg.vocab_size
    per_token = 4 * H + 2 * (nh + 2 * nkv) * hd + 2 * nh * hd + 3 * inter
    activations = 4 * 4 * tokens * per_token
    mask = 2 * tokens * tokens
    return (state + logits + activations + mask) / MB + 200


def run_child(kind: str, **overrides) -> dict:
    from grpo_memory import LIVE_MEMORY_ENV  # the peak RSS then follows live tensors, not glibc's kept heap

    env = {**os.environ, **LIVE_MEMORY_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.test_realistic_shape", kind, json.dumps(overrides)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~1-2 min: a bf16 matmul with a 152k vocabulary runs at a few GFLOP/s on one CPU core
def test_a_grpo_step_and_an_sft_step_at_2k_tokens_stay_under_the_shape_bound():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from grpo_memory import realistic_config

    cfg = realistic_config(HIDDEN, LAYERS)
    grpo = run_child("grpo")
    assert grpo["peak_reset"] and grpo["loss_finite"] and grpo["weights_changed"]
    assert grpo["peak_growth_mb"] < bound_mb(cfg, GRPO_CHUNK, PROMPT + LONG), grpo
    sft = run_child("sft")
    assert sft["peak_reset"] and sft["loss_finite"] and sft["weights_changed"]
    from grpo.logprobs import CHECKPOINT_ABOVE

    assert sft["peak_growth_mb"] < bound_mb(cfg, CHECKPOINT_ABOVE // cfg.vocab_size, PROMPT + LONG), sft


@pytest.mark.slow  # ~40 s of CPU: four child processes
def test_the_memory_benchmark_smoke_measures_both_sides(tmp_path):
    out = tmp_path / "memory.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_memory.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (point,) = json.loads(out.read_text())["points"]
    assert point["completion_tokens"] == 64 and point["ours_peak_reset"] and point["trl_peak_reset"]
    assert point["ours_peak_mb"] > 0 and point["trl_peak_mb"] > 0 and point["ours_s"] > 0 and point["trl_s"] > 0


def grpo_step(overrides: dict) -> dict:
    import torch
    from grpo_memory import FixedRollout, measured, ours_config, realistic_model, reward

    from grpo.trainer import GRPOTrainer

    model = realistic_model(HIDDEN, LAYERS, PROMPT + LONG + 8)
    g = torch.Generator().manual_seed(0)
    prompt, long, short = (torch.randint(100, 150_000, (n,), generator=g).tolist() for n in (PROMPT, LONG, SHORT))
    cfg = ours_config(LONG, 1, **{"beta": 0.0, "logprob_chunk_size": GRPO_CHUNK, **overrides})
    trainer = GRPOTrainer(model, None, cfg, [{"prompt": "p"}], [("alternate", reward, 1.0)],
                          backend=FixedRollout(prompt, [long, short]), progress=False)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    out = {}

    def step():
        (m,) = trainer.train(max_steps=1)
        out["loss_finite"] = bool(torch.isfinite(torch.tensor(m["loss"]))) and m["skipped_steps"] == 0

    r = measured(step, [0.0], [0.0])
    return {**r, **out, "weights_changed": not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)}


def test_the_sft_loss_is_hugging_faces_without_its_full_logits(tok, monkeypatch):
    """`response_nll` gives the Hugging Face loss (times the label count) and its gradient, while what autograd keeps
    holds no (rows x positions x vocabulary) logits: with chunks of 8 positions, nothing near that size."""
    import torch

    import grpo.logprobs
    from stages.core.sft import collate, response_nll, tokenize_examples
    from tests.conftest import build_tiny_model

    model = build_tiny_model(tok, num_hidden_layers=2).train()
    rows = [{"prompt": f"User: {a}+{b}\nAssistant:", "completion": f" {a + b} because {a} plus {b}"}
            for a, b in [(3, 4), (12, 30), (7, 8)]]
    ids, labels, attn = collate(tokenize_examples(tok, rows, 64), tok.pad_token_id)
    tokens = int((labels[:, 1:] != -100).sum())
    ref = model(input_ids=ids, attention_mask=attn, labels=labels).loss * tokens
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    monkeypatch.setattr(grpo.logprobs, "CHECKPOINT_ABOVE", 8 * len(tok))  # chunks of 8 positions, recomputed
    big = []

    def pack(t):
        if t.numel() >= ids.numel() * len(tok):
            big.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll = response_nll(model, ids, attn, labels)
    assert not big and torch.allclose(nll, ref, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(nll, list(model.parameters())), ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


class IdTokenizer:
    """Text that is token ids ("17 4093 ..."): examples in the realistic model's vocabulary, no tokenizer to build."""

    eos_token_id = pad_token_id = PAD

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}


def sft_step(overrides: dict) -> dict:
    import torch
    from grpo_memory import measured, realistic_model

    from stages.core.sft import SFTConfig, SFTTrainer

    model = realistic_model(HIDDEN, LAYERS, PROMPT + LONG + 8)
    cfg = SFTConfig(**{"max_steps": 1, "batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-5,
                       "warmup_steps": 0, "precision": "bf16", "gradient_checkpointing": True,
                       "max_length": PROMPT + LONG + 1, **overrides})
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(map(str, torch.randint(100, 150_000, (n,), generator=g).tolist()))

    examples = [{"prompt": text(PROMPT), "completion": text(n)} for n in (LONG, SHORT)]
    trainer = SFTTrainer(model, IdTokenizer(), examples, cfg, progress=False)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    out = {}

    def step():
        res = trainer.train()
        out["loss_finite"] = bool(torch.isfinite(torch.tensor(res.final_loss))) and res.steps == 1

    r = measured(step, [0.0], [0.0])
    return {**r, **out, "weights_changed": not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    torch.set_num_threads(1)
    kind, overrides = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(grpo_step(overrides) if kind == "grpo" else sft_step(overrides)))
