"""LoRA adapters (grpo/lora.py) in the GRPO and SFT loops: config refusals, the reference as a frozen snapshot of the
adapter on the shared base, learning, optimiser memory, exact resume, the merged model that is saved and synced."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from pydantic import ValidationError

from grpo.checkpoint import CheckpointMismatchError
from grpo.config import GRPOConfig, LoRAConfig
from grpo.lora import ADAPTER_KEY, adapter_state_dict, merged_state_dict
from grpo.trainer import GRPOTrainer
from stages.core.sft import SFTConfig, SFTTrainer
from stages.core.tasks import make_problems
from tests.conftest import build_tiny_model

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def dataset():
    return [{"prompt": f"User: {p.question}\nAssistant:", "answer": p.answer} for p in make_problems("addition", 64, 1)]


def digit_share(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def config(**kw) -> GRPOConfig:
    base = {"prompts_per_step": 2, "num_generations": 4, "steps_per_iteration": 2, "beta": 0.0, "learning_rate": 3e-2,
            "max_completion_length": 8, "max_prompt_length": 32, "seed": 0, "lora": LORA}
    return GRPOConfig(**{**base, **kw})


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not ADAPTER_KEY.search(k)}


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- config


@pytest.mark.parametrize("bad, field", [({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                                        ({"dropout": -0.1}, "dropout"), ({"target_modules": []}, "target_modules"),
                                        ({"target_modules": ["q_proj", " "]}, "target_modules"),
                                        ({"ranks": 8}, "ranks")])
def test_bad_lora_settings_are_refused_naming_the_field(bad, field):
    for cfg in (GRPOConfig, SFTConfig):
        with pytest.raises(ValidationError, match=rf"lora\.{field}"):
            cfg(lora={"enabled": True, **bad})


def test_lora_defaults_off_with_the_llama_projections():
    assert not GRPOConfig().lora.enabled and not SFTConfig().lora.enabled
    assert LoRAConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LoRAConfig(alpha=16).alpha == 16.0  # YAML's integer alpha is a number


def test_unknown_target_module_and_zero3_are_refused(tok, dataset):
    from stages.core.preflight import check_cluster
    from stages.core.recipe import load_recipe

    cfg = config(lora=LoRAConfig(enabled=True, target_modules=["qkv"]))
    with pytest.raises(ValueError, match=r"lora.target_modules=\['qkv'\].*q_proj"):
        GRPOTrainer(build_tiny_model(tok), tok, cfg, dataset, [("d", digit_share, 1.0)], progress=False)
    zero3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="lora.enabled with DeepSpeed ZeRO-3"):  # before DeepSpeed is touched
        GRPOTrainer(build_tiny_model(tok), tok, config(), dataset, [("d", digit_share, 1.0)], progress=False,
                    deepspeed_config=zero3)
    assert LoRAConfig().deepspeed_problems(zero3) == LORA.deepspeed_problems({"zero_optimization": {"stage": 2}}) == []
    # and at preflight, before any model loads: the stage's own config, else the cluster's
    over = {"cluster.launcher": "torchrun", "cluster.nproc_per_node": 2, "cluster.deepspeed_config":
            "infra/deepspeed/zero3.json", "r1_zero.grpo.lora.enabled": True, "cold_start_sft.sft.lora.enabled": True}
    problems = check_cluster(load_recipe("tiny", over), ["r1_zero", "cold_start_sft"])
    assert [p.split(" with DeepSpeed ZeRO-3")[0] for p in problems] == ["r1_zero.grpo.lora.enabled",
                                                                         "cold_start_sft.sft.lora.enabled"]
    assert all(p.endswith("(infra/deepspeed/zero3.json)") for p in problems)
    over["r1_zero.deepspeed_config"] = "infra/deepspeed/zero2.json"
    assert len(check_cluster(load_recipe("tiny", over), ["r1_zero", "cold_start_sft"])) == 1


# ---- the model: log-probs, fast path, merged weights


def test_lora_logprobs_equal_the_plain_forward_and_the_merged_model(tok, dataset):
    from grpo.fast import use_fast_path
    from grpo.logprobs import packed_completion_logprobs
    from grpo.lora import add_adapter
    from grpo.rollout import HFGenerateBackend

    model = add_adapter(build_tiny_model(tok), LORA)
    with torch.no_grad():  # B is zero at init: give the adapters a non-zero effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert not use_fast_path(model)  # peft's Linear is not a plain nn.Linear: the reference path runs
    prompt_ids, prompt_mask = HFGenerateBackend(None, tok, 32).tokenize_prompts([r["prompt"] for r in dataset[:3]])
    completion_ids = torch.randint(3, len(tok), (3, 5))
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    logp, _ = packed_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)

    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    from grpo.logprobs import position_ids_from_mask

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    full = torch.log_softmax(logits[:, prompt_ids.shape[1] - 1 : -1].float(), -1)
    expected = full.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask
    assert torch.allclose(logp, expected, atol=1e-5)

    merged = build_tiny_model(tok)
    merged.load_state_dict(merged_state_dict(model))  # strict: exactly the plain model's names
    merged_logp, _ = packed_completion_logprobs(merged, prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert torch.allclose(logp, merged_logp, atol=1e-5)
    assert not torch.allclose(logp, packed_completion_logprobs(build_tiny_model(tok), prompt_ids, prompt_mask,
                                                               completion_ids, completion_mask)[0], atol=1e-3)


# ---- the reference


def test_reference_is_a_snapshot_of_the_adapter_on_the_shared_base(tok, dataset):
    """β > 0, two iterations of two steps: at each iteration start the reference's adapter is the policy's, and
    mid-iteration it stayed while the policy's moved; the base weights never change and are held once (the reference's
    are the policy's own tensors); the first reference, B still zero, is exactly the base without adapters."""
    def length(prompts, completions, **kw):  # differs within groups: every update moves the policy
        return [len(c) / 10 for c in completions]

    plain = build_tiny_model(tok)
    trainer = GRPOTrainer(build_tiny_model(tok), tok, config(beta=0.1, iterations=2), dataset,
                          [("length", length, 1.0)], progress=False)
    policy = trainer.engine.module
    base = base_weights(policy)  # peft renames an adapted layer's weight x.weight to x.base_layer.weight
    assert equal({k.replace(".base_layer", ""): v for k, v in base.items()}, base_weights(plain))
    for step in range(4):
        before = adapter(policy)
        trainer.train(max_steps=1)
        ref = trainer.reference
        kl = trainer.last_update_stats["kl"][0]
        if step % 2 == 0:
            start = before
            assert kl == pytest.approx(0.0, abs=1e-7), step
        else:
            assert kl > 1e-6, step
        assert equal(adapter(ref), start), step
        assert not equal(adapter(ref), adapter(policy)), step
        assert not any(p.requires_grad for p in ref.parameters())
        assert any(p.requires_grad for p in policy.parameters())
        assert policy.training and not any(m.training for m in ref.modules())  # ref.eval() left the policy alone
        shared = {id(p) for p in policy.parameters()} & {id(p) for p in ref.parameters()}
        assert len(shared) == len(list(plain.parameters()))  # every base weight, the very same tensor
        assert equal(base_weights(policy), base)
        if step == 0:  # the first reference: B = 0, so exactly the model without adapters
            ids = torch.randint(3, len(tok), (2, 9))
            with torch.no_grad():
                assert torch.equal(ref(ids).logits, plain(ids).logits)


# ---- learning, memory


def test_lora_grpo_learns_and_trains_only_the_adapters(tok, dataset):
    """A policy with a peaked output distribution (larger init: the tiny random model is near uniform, and its frozen
    LM head would leave LoRA nothing to sharpen) learns to write digits; only the adapters move."""
    cfg = config(prompts_per_step=4, steps_per_iteration=20, learning_rate=5e-2, max_completion_length=12,
                 lora=LoRAConfig(enabled=True, rank=8, alpha=16.0))
    trainer = GRPOTrainer(build_tiny_model(tok, initializer_range=0.5), tok, cfg, dataset,
                          [("digits", digit_share, 1.0)], progress=False)
    base, start = base_weights(trainer.engine.module), adapter(trainer.engine.module)
    rewards = [m["reward/mean"] for m in trainer.train()]
    assert sum(rewards[:5]) / 5 < 0.1 and sum(rewards[-5:]) / 5 > 0.5, rewards
    assert equal(base_weights(trainer.engine.module), base)
    now = adapter(trainer.engine.module)
    assert all(not torch.equal(now[k], start[k]) for k in start)


def optimizer_state_bytes(trainer) -> int:
    return sum(t.numel() * t.element_size() for s in trainer.engine.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def test_trained_weights_and_optimizer_state_far_below_full_fine_tuning(tok, dataset):
    """rank r on a Linear in -> out trains r(in + out) weights; AdamW keeps two fp32 moments per trained weight."""
    runs = {}
    for name, lora in (("full", LoRAConfig()), ("lora", LORA)):
        trainer = GRPOTrainer(build_tiny_model(tok), tok, config(lora=lora), dataset, [("d", digit_share, 1.0)],
                              progress=False)
        trainer.train(max_steps=1)
        trained = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
        runs[name] = trained, optimizer_state_bytes(trainer)
    h, kv, ff = 32, 16, 64  # the tiny model: hidden, k/v width (2 KV heads of 8), MLP width
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)]  # q k v o gate up down
    assert runs["lora"][0] == sum(4 * (i + o) for i, o in shapes) == 2048
    assert runs["full"][0] == sum(p.numel() for p in build_tiny_model(tok).parameters())
    step_counters = 14 * 4  # one fp32 step count per trained tensor
    assert runs["lora"][1] == 2 * 4 * 2048 + step_counters
    assert runs["lora"][1] * 8 < runs["full"][1]


# ---- checkpoints, saved model, vLLM


def checkpoint_trainer(tok, out, adapter_shift=0.0, lora=None, base_seed=0):
    cfg = config(prompts_per_step=3, iterations=2, steps_per_iteration=4, mu=2, minibatch_size=6, beta=0.05,
                 warmup_steps=2, lr_schedule="cosine", checkpoint_every=3, seed=7,
                 lora=lora or LoRAConfig(enabled=True, rank=4, alpha=8.0, dropout=0.1))
    rows = [{"prompt": f"User: {p.question}\nAssistant:", "answer": p.answer} for p in make_problems("addition", 8, 1)]

    def digits(prompts, completions, answer, **kw):
        return [sum(ch.isdigit() for ch in c) / 8 + random.random() * 0.01 for c in completions]

    trainer = GRPOTrainer(build_tiny_model(tok, base_seed), tok, cfg, rows, [("digits", digits, 1.0)], output_dir=out,
                          progress=False)
    with torch.no_grad():
        for p in adapter_state_dict(trainer.engine.module).values():
            p.add_(adapter_shift)
    return trainer


def test_lora_resume_equals_uninterrupted_and_checkpoints_hold_the_adapter(tok, tmp_path):
    full = checkpoint_trainer(tok, tmp_path / "full")
    losses_full = [m["loss"] for m in full.train()]
    first = checkpoint_trainer(tok, tmp_path / "split")
    first.train(max_steps=3)
    ckpt = tmp_path / "split" / "checkpoint-3"
    for file in ("policy.pt", "reference.pt"):  # the adapter only: the frozen base is the model directory's
        saved = torch.load(ckpt / file, weights_only=True)
        assert saved.keys() == adapter_state_dict(first.engine.module).keys(), file
    # a fresh trainer whose adapter starts elsewhere (and the random streams moved on) resumes mid-iteration
    random.seed(123)
    torch.manual_seed(123)
    second = checkpoint_trainer(tok, tmp_path / "split", adapter_shift=1.0)
    assert not equal(adapter(second.engine.module), adapter(full.engine.module))
    losses_second = [m["loss"] for m in second.train(resume_from="latest")]
    assert losses_second == losses_full[3:]
    assert equal(second.engine.module.state_dict(), full.engine.module.state_dict())
    assert equal(adapter(second.reference), adapter(full.reference))

    for lora in (LoRAConfig(enabled=True, rank=2), LoRAConfig(enabled=True, target_modules=["q_proj"])):
        other = checkpoint_trainer(tok, tmp_path / "other", lora=lora)
        with pytest.raises(ValueError, match=r"policy.pt does not hold this model's LoRA adapter \(lora.rank"):
            other.resume(tmp_path / "split" / "checkpoint-8")
    # the adapter alone would resume over any base of the same architecture: the base weights' fingerprint refuses it
    other_base = checkpoint_trainer(tok, tmp_path / "other", base_seed=1)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-8 \(model_config.json\) belongs to a different "
                       r"model \(lora_base_weights: '\w+' in the checkpoint, '\w+' in the model\)"):
        other_base.resume(tmp_path / "split" / "checkpoint-8")


def test_saved_model_is_the_merged_plain_model(tok, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = GRPOTrainer(build_tiny_model(tok), tok, config(), dataset, [("d", digit_share, 1.0)], progress=False)
    trainer.train()
    policy = trainer.engine.module
    trainer.save_model(tmp_path / "model")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(saved) is type(policy) and saved.state_dict().keys() == build_tiny_model(tok).state_dict().keys()
    ids = torch.randint(3, len(tok), (3, 10))
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, policy(ids).logits, atol=1e-5)
        assert not torch.allclose(saved(ids).logits, build_tiny_model(tok)(ids).logits, atol=1e-3)  # it trained
    assert any("lora" in k for k in policy.state_dict())  # the policy itself was not merged


def test_vllm_is_fed_the_merged_weights(tok, dataset, tmp_path, monkeypatch):
    from tests.test_rollout_vllm import FakeVLLM, length_reward, vllm_config

    fake = FakeVLLM(tok)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    build_tiny_model(tok).save_pretrained(tmp_path / "policy")
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    sampled_with = {}  # step -> the merged weights of the policy that sampled it (callbacks run before the update)
    trainer = GRPOTrainer(policy, tok, vllm_config(lora=LORA), dataset, [("len", length_reward, 1.0)], progress=False,
                          callbacks=[lambda step, *_: sampled_with.update({step: merged_state_dict(policy)})])
    trainer.train()
    loads = [e[1][0] for e in fake.events if e[0] == "load"]
    plain = dict(build_tiny_model(tok).named_parameters())
    first, second = dict(loads[: len(plain)]), dict(loads[len(plain) :])
    assert len(loads) == 2 * len(plain) and first.keys() == second.keys() == plain.keys()  # no adapter, no base_layer
    assert equal(first, {k: v for k, v in sampled_with[1].items() if k in plain})
    assert equal(second, {k: v for k, v in sampled_with[2].items() if k in plain})
    assert not equal(first, second)  # step 1's update reached vLLM


# ---- SFT


def test_sft_with_lora_lowers_the_loss_and_saves_the_merged_model(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    data = [{"prompt": f"User: {q}\nAssistant:", "completion": f" <answer>{a}</answer>"}
            for q, a in [("1+1", "2"), ("2+2", "4"), ("3+4", "7")]] * 8
    model = build_tiny_model(tok, initializer_range=0.5)
    plain = base_weights(build_tiny_model(tok, initializer_range=0.5))
    cfg = SFTConfig(max_steps=30, batch_size=8, learning_rate=3e-2, warmup_steps=2, log_every=5,
                    lora=LoRAConfig(enabled=True, rank=8, alpha=16.0))
    trainer = SFTTrainer(model, tok, data, cfg, progress=False)
    res = trainer.train()
    first, last = res.history[0]["sft/loss"], res.history[-1]["sft/loss"]
    assert last < 0.3 * first, (first, last)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4096
    trainer.save_model(tmp_path / "model")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(3, len(tok), (2, 8))
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, model(ids).logits, atol=1e-4)
    untouched = [k for k in plain if "norm" in k or "embed" in k or k.endswith("bias")]
    assert untouched and all(torch.equal(saved.state_dict()[k], plain[k]) for k in untouched)


# ---- DeepSpeed ZeRO-2 (2 CPU ranks)


def zero2_worker(out: str) -> None:
    """Run by torchrun: 3 LoRA steps on 2 ranks, the merged weights saved; a fresh trainer resumes from step 2."""
    import json

    import deepspeed
    import torch.distributed as dist

    from tests.test_grpo_distributed import setup

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}

    def trainer():
        model, tok, cfg, dataset, funcs, backend = setup()
        cfg = cfg.model_copy(update={"lora": LORA, "checkpoint_every": 2})
        return GRPOTrainer(model, tok, cfg, dataset, funcs, backend=backend, deepspeed_config=ds, progress=False,
                           output_dir=f"{out}/ckpt")

    full = trainer()
    history = [m["loss"] for m in full.train()]
    merged = full.engine.full_state_dict()
    resumed = trainer()
    assert [m["loss"] for m in resumed.train(resume_from=f"{out}/ckpt/checkpoint-2")] == history[2:]
    assert equal(resumed.engine.full_state_dict(), merged)
    if dist.get_rank() == 0:
        torch.save(merged, f"{out}/merged.pt")
        with open(f"{out}/history.json", "w") as f:
            json.dump(history, f)


@pytest.mark.slow
def test_lora_on_two_zero2_ranks_matches_one_process(tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    from tests.test_grpo_distributed import setup

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29618", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model, tok, cfg, dataset, funcs, backend = setup()
    single = GRPOTrainer(model, tok, cfg.model_copy(update={"lora": LORA}), dataset, funcs, backend=backend,
                         progress=False)
    losses = [m["loss"] for m in single.train()]
    assert losses == pytest.approx(json.loads((tmp_path / "history.json").read_text()), rel=1e-4, abs=1e-6)
    ds_merged = torch.load(tmp_path / "merged.pt")
    assert all(torch.allclose(v, ds_merged[k], atol=1e-5) for k, v in single.engine.full_state_dict().items())


if __name__ == "__main__":
    zero2_worker(sys.argv[1])
