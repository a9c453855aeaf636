"""Scale knobs of GRPO and SFT: precision (bf16 weights, fp16 autocast), gradient checkpointing (both log-prob paths)
and micro-batching with gradient accumulation (the same update as one big batch, for every loss aggregation)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.engine import runtime_config
from grpo.fast import use_fast_path
from grpo.trainer import GRPOTrainer
from stages.core.sft import SFTConfig, SFTTrainer
from stages.core.tasks import clean_trace, make_problems

DS_DIR = Path(__file__).resolve().parents[1] / "infra" / "deepspeed"


@pytest.fixture(scope="module")
def dataset():
    return [{"prompt": f"User: {p.question}\nAssistant:", "answer": p.answer} for p in make_problems("addition", 16, 1)]


@pytest.fixture(scope="module")
def sft_data():
    return [{"prompt": f"User: {p.question}\nAssistant:", "completion": " " + clean_trace(p)}
            for p in make_problems("addition", 8, seed=2)]


def length_reward(prompts, completions, **columns):
    return [len(c) / 10 for c in completions]


def grpo_config(**kw):
    base = {"prompts_per_step": 2, "num_generations": 4, "steps_per_iteration": 1, "beta": 0.04, "learning_rate": 1e-3,
            "max_completion_length": 8, "max_prompt_length": 32, "seed": 0}
    return GRPOConfig(**{**base, **kw})


def trainer_for(model, tok, dataset, **kw):
    return GRPOTrainer(copy.deepcopy(model), tok, grpo_config(**kw), dataset, [("len", length_reward, 1.0)],
                       progress=False)


def fixed_rollout(model, tok, dataset):
    """One rollout of 2 prompts x 4 completions (some end early), sampled once and reused by every trainer."""
    t = trainer_for(model, tok, dataset)
    torch.manual_seed(3)
    return t.backend.generate([r["prompt"] for r in dataset[:2]], 4, t.sampling)


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, -1.0])


def update(trainer, rollout, advantages=ADVANTAGES):
    """One policy_update with a fresh reference: (every update's stats, weights after, backward and step calls, each
    update's gradients as the optimiser step sees them)."""
    trainer.reference = trainer.engine.make_reference()
    calls, grads = {"backward": 0, "step": 0}, []
    for name in calls:
        inner = getattr(trainer.engine, name)

        def counted(*a, inner=inner, name=name):
            calls[name] += 1
            if name == "step":
                grads.append({n: p.grad.clone() for n, p in trainer.engine.module.named_parameters()})
            return inner(*a)

        setattr(trainer.engine, name, counted)
    trainer.policy_update(rollout, advantages)
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    return trainer.last_update_stats, weights, calls, grads


def assert_same_update(a, b, tol=1e-6):
    """Same losses, gradient norms, gradients and weights after. (AdamW's first steps are about lr·sign(g), so the
    weights only match to ~1e-6 at a small learning rate: a 1e-8 difference flips the sign of a near-zero gradient.)"""
    (stats_a, weights_a, _, grads_a), (stats_b, weights_b, _, grads_b) = a, b
    for key in ("loss", "grad_norm"):
        assert len(stats_a[key]) == len(stats_b[key])
        for x, y in zip(stats_a[key], stats_b[key]):
            assert math.isclose(x, y, rel_tol=tol, abs_tol=tol), (key, x, y)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        for k in ga:
            assert torch.allclose(ga[k], gb[k], atol=tol, rtol=0), k
    for k in weights_a:
        assert torch.allclose(weights_a[k], weights_b[k], atol=tol, rtol=0), k


# ---- precision
def test_grpo_step_in_bf16_on_cpu(tiny_model, tok, dataset):
    model = tiny_model(tok)
    trainer = trainer_for(model, tok, dataset, precision="bf16")
    policy = trainer.engine.module
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    history = trainer.train()  # rollout (bf16 generation), rewards, update
    assert math.isfinite(history[0]["loss"]) and history[0]["skipped_steps"] == 0
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert trainer.engine.optimizer.state[next(policy.parameters())]["exp_avg"].dtype == torch.bfloat16


def test_sft_step_in_bf16_on_cpu(tiny_model, tok, sft_data):
    model = tiny_model(tok)
    cfg = SFTConfig(max_steps=1, batch_size=4, learning_rate=1e-2, warmup_steps=0, precision="bf16")
    trainer = SFTTrainer(model, tok, sft_data, cfg, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = trainer.train()
    assert math.isfinite(res.history[0]["sft/loss"]) and res.history[0]["sft/skipped_steps"] == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grpo_step_in_fp16_autocast_on_cpu(tiny_model, tok, dataset, tmp_path):
    """fp16: fp32 weights, the forward under autocast(fp16) (reference log-prob path), a GradScaler on the engine,
    whose state a checkpoint keeps."""
    model = tiny_model(tok)
    trainer = trainer_for(model, tok, dataset, precision="fp16")
    policy = trainer.engine.module
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    assert trainer.engine.scaler is not None
    history = trainer.train()
    assert math.isfinite(history[0]["loss"]) and history[0]["skipped_steps"] == 0
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    trainer.engine.scaler.update(1234.0)  # a scale no fresh scaler has
    trainer.save(tmp_path / "ck")
    resumed = trainer_for(model, tok, dataset, precision="fp16")
    resumed.resume(tmp_path / "ck")
    assert resumed.engine.scaler.get_scale() == 1234.0


def test_deepspeed_config_follows_precision_and_micro_batches():
    file = json.loads((DS_DIR / "zero2.json").read_text())
    cfg = runtime_config(file, max_grad_norm=0.5, world=2, precision="bf16", micro_batch_size=2, accumulation=4)
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True} and cfg["fp16"]["enabled"] is False
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (2, 4, 16)
    assert cfg["gradient_clipping"] == 0.5
    assert file["bf16"] == {"enabled": False} and file["gradient_accumulation_steps"] == 1  # the file's dict untouched
    fp16 = runtime_config(file, max_grad_norm=None, world=1, precision="fp16")
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False and fp16["gradient_clipping"] == 0.0
    assert fp16["gradient_accumulation_steps"] == 1 and fp16["train_batch_size"] == 1  # no micro-batching: as before
    enabled = {**file, "bf16": {"enabled": True}}
    assert runtime_config(enabled, 1.0, 1, precision="fp32")["bf16"]["enabled"] is False  # precision rules


# ---- gradient checkpointing
MODELS = {"fast": {}, "reference": {"arch": "llama", "mlp_bias": True}}  # an MLP bias rules the fast path out


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_gradient_checkpointing_gives_the_same_update(tiny_model, tok, dataset, path, monkeypatch):
    model = tiny_model(tok, **MODELS[path]).eval()  # as stages load it: Hugging Face checkpoints only in train mode
    assert use_fast_path(model) == (path == "fast")
    rollout = fixed_rollout(model, tok, dataset)
    layer_runs = []
    if path == "fast":  # count the decoder layer's runs
        import grpo.fast.shared_prompt as sp

        inner = sp.attend
        monkeypatch.setattr(sp, "attend", lambda *a: layer_runs.append(1) or inner(*a))
    else:  # count the MLP's runs (hooks do not fire when the checkpoint recomputes)
        mlp = type(model.model.layers[0].mlp)
        inner = mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda *a, **k: layer_runs.append(1) or inner(*a, **k))
    runs = {}
    for on in (False, True):
        trainer = trainer_for(model, tok, dataset, gradient_checkpointing=on)
        layer_runs.clear()
        runs[on] = update(trainer, rollout)
        runs[on] = (*runs[on], len(layer_runs))
    assert_same_update(runs[False][:4], runs[True][:4])
    # the layer really was recomputed in the backward pass (not silently off, e.g. in eval mode)
    assert runs[True][4] > runs[False][4]
    assert not trainer.engine.module.training  # the policy is back in eval mode after the update


def test_sft_gradient_checkpointing_gives_the_same_step(tiny_model, tok, sft_data):
    model = tiny_model(tok)
    out = {}
    for on in (False, True):
        m = copy.deepcopy(model)
        cfg = SFTConfig(max_steps=1, batch_size=4, learning_rate=1e-2, warmup_steps=0, gradient_checkpointing=on)
        res = SFTTrainer(m, tok, sft_data, cfg, progress=False).train()
        out[on] = res.history[0], m.state_dict()
    for key in ("sft/loss", "sft/grad_norm"):
        assert math.isclose(out[False][0][key], out[True][0][key], rel_tol=1e-6), key
    for k, v in out[False][1].items():
        assert torch.allclose(v, out[True][1][k], atol=1e-6, rtol=0), k


# ---- micro-batching
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "dr_grpo"])
def test_micro_batches_give_the_one_batch_update(tiny_model, tok, dataset, aggregation):
    """mu=2 over minibatches of 4: each update accumulated over 2 micro-batches of 2 equals the one-forward update."""
    model = tiny_model(tok)
    rollout = fixed_rollout(model, tok, dataset)
    kw = {"loss_aggregation": aggregation, "mu": 2, "minibatch_size": 4}
    whole = update(trainer_for(model, tok, dataset, **kw), rollout)
    micro = update(trainer_for(model, tok, dataset, micro_batch_size=2, **kw), rollout)
    assert_same_update(whole, micro)
    assert whole[2] == {"backward": 4, "step": 4}  # 2 passes x 2 minibatches
    assert micro[2] == {"backward": 8, "step": 4}  # two backwards per optimiser step


def test_micro_batches_on_the_reference_path(tiny_model, tok, dataset):
    model = tiny_model(tok, **MODELS["reference"])
    rollout = fixed_rollout(model, tok, dataset)
    whole = update(trainer_for(model, tok, dataset, loss_aggregation="token_mean"), rollout)
    micro = update(trainer_for(model, tok, dataset, loss_aggregation="token_mean", micro_batch_size=2), rollout)
    assert_same_update(whole, micro)


def test_a_non_finite_micro_batch_skips_its_whole_update_once(tiny_model, tok, dataset):
    """A NaN in one micro-batch of the first of two updates: that update is skipped (counted once), the second runs."""
    model = tiny_model(tok)
    rollout = fixed_rollout(model, tok, dataset)
    trainer = trainer_for(model, tok, dataset, minibatch_size=4, micro_batch_size=2)
    trainer.training.start_step()
    adv = ADVANTAGES.clone()
    adv[2] = float("nan")  # the second micro-batch of the first update
    stats, weights, calls, _ = update(trainer, rollout, adv)
    trainer.training.end_step()
    assert calls == {"backward": 4, "step": 2}
    assert trainer.engine.skipped_steps == 1 and trainer.training.bad_in_a_row == 1
    assert math.isnan(stats["loss"][0]) and math.isfinite(stats["loss"][1])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(model.state_dict()[k], w) for k, w in weights.items())  # the second update applied


def test_sft_micro_batches_give_the_one_batch_step(tiny_model, tok, sft_data):
    model = tiny_model(tok)
    out = {}
    for micro in (None, 2):
        m = copy.deepcopy(model)
        cfg = SFTConfig(max_steps=2, batch_size=4, learning_rate=1e-2, warmup_steps=0, micro_batch_size=micro)
        res = SFTTrainer(m, tok, sft_data, cfg, progress=False).train()
        out[micro] = res.history, m.state_dict()
    for h_whole, h_micro in zip(out[None][0], out[2][0]):
        for key in ("sft/loss", "sft/grad_norm"):
            assert math.isclose(h_whole[key], h_micro[key], rel_tol=1e-6), key
    for k, v in out[None][1].items():
        assert torch.allclose(v, out[2][1][k], atol=1e-6, rtol=0), k


def test_micro_batch_size_must_divide_each_ranks_minibatch():
    with pytest.raises(ValueError, match=r"micro_batch_size: 3 does not divide the 8 completions of a minibatch"):
        grpo_config(micro_batch_size=3)
    cfg = grpo_config(micro_batch_size=4)
    assert cfg.world_problems(2) == []
    assert cfg.world_problems(4)[-1].startswith("micro_batch_size: 4 does not divide the 2 completions")
    with pytest.raises(ValueError, match=r"micro_batch_size: 3 does not divide the 4 examples of a batch per rank"):
        SFTConfig(batch_size=4, micro_batch_size=3)
    assert SFTConfig(batch_size=8, micro_batch_size=2).world_problems(2) == []
    assert SFTConfig(batch_size=8, micro_batch_size=4).world_problems(4)[0].startswith("micro_batch_size: 4")



DEEPSPEED_ACCUMULATION = """
import copy, json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
from grpo.engine import DeepSpeedEngine, TorchEngine
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
x, y = torch.randn(8, 4), torch.randn(8, 1)
file = json.load(open(sys.argv[1]))
def run(micro):
    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    e = (TorchEngine(m, opt, sch, 1.0) if micro is None
         else DeepSpeedEngine(m, opt, sch, 1.0, file, micro_batch_size=micro, accumulation=8 // micro))
    norms, mb = [], micro or 8
    for _ in range(3):
        for s in range(0, 8, mb):
            e.backward(((e.module(x[s:s + mb]) - y[s:s + mb]) ** 2).sum() / 8)  # each micro-batch's share
        norms.append(e.step())
    return norms, [p.detach() for p in e.module.parameters()]
(n_ref, w_ref), (n_ds, w_ds) = run(None), run(2)
assert all(abs(a - b) < 1e-6 for a, b in zip(n_ref, n_ds)), (n_ref, n_ds)
assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(w_ref, w_ds))
print("same updates")
"""


@pytest.mark.slow
def test_deepspeed_accumulates_micro_batches_into_one_update(tmp_path):
    """ZeRO-2 on one CPU process, 4 micro-batches per update (backward + step each, DeepSpeed updating at the
    boundary only): the same three updates as plain torch on the whole batch."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(DS_DIR.parents[1])}
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_ACCUMULATION, str(DS_DIR / "zero2.json")], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0 and "same updates" in out.stdout, out.stderr[-3000:]
