"""Truncated importance sampling for vLLM rollouts (issue #18): the weight min(π_old / π_sampler, C), the loss it
weights (the surrogate, not the KL), the trainer's gap metrics and weighted loss with a fake backend that reports
sampler log-probs at known offsets from the trainer's, the vLLM backend's sampler log-probs aligned with the kept
tokens (through a fake vLLM module), and the config's refusals. vLLM itself runs only on a GPU machine."""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace as NS

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from grpo.config import GRPOConfig
from grpo.loss import grpo_loss, kl_k3, truncated_is_weight
from grpo.rollout import HFGenerateBackend, SamplingParams
from grpo.trainer import GRPOTrainer
from stages.core.tasks import make_problems

NAN = math.nan


# ---- the weight
def test_weight_is_the_capped_ratio_one_where_unknown_and_detached():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0, -2.0, NAN]])
    w = truncated_is_weight(old, sampler, cap=2.0)
    # exp(0.5) = 1.6487, exp(-1) = 0.3679, exp(1.5) = 4.48 -> capped at 2, NaN -> 1
    assert w[0].tolist() == pytest.approx([1.6487213, 0.3678794, 2.0, 1.0], abs=1e-6)
    assert not w.requires_grad


# ---- the loss
def hand_loss(logp_new, logp_old, adv, mask, w, logp_ref, beta, eps):
    """Sequence mean of w·(−min(ρÂ, clip(ρ)Â)) + β·k3, written out per token."""
    rows = []
    for i in range(len(logp_new)):
        terms = []
        for t in range(len(logp_new[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp_new[i][t] - logp_old[i][t])
            a = adv[i]
            surrogate = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            d = logp_ref[i][t] - logp_new[i][t]
            terms.append(w[i][t] * surrogate + beta * (math.exp(d) - d - 1))
        rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


def test_weighted_loss_matches_hand_computation_and_leaves_the_kl_unweighted():
    logp_new = torch.tensor([[-1.0, -0.7, -2.0], [-0.3, -1.2, -0.9]])
    logp_old = torch.tensor([[-1.1, -0.5, -2.0], [-0.6, -1.0, -0.9]])
    logp_ref = torch.tensor([[-1.3, -0.6, -1.5], [-0.2, -1.4, -1.0]])
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = torch.tensor([[0.5, 2.0, 1.0], [1.5, 0.25, 3.0]])
    beta, eps = 0.1, 0.2
    loss, stats = grpo_loss(logp_new, logp_old, adv, mask, logp_ref=logp_ref, beta=beta, eps_low=eps, eps_high=eps,
                            is_weight=w)
    expected = hand_loss(logp_new.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist(), w.tolist(),
                         logp_ref.tolist(), beta, eps)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the weights touch only the surrogate: with β the loss moves by β·KL exactly as without weights
    loss0, _ = grpo_loss(logp_new, logp_old, adv, mask, logp_ref=logp_ref, beta=0.0, is_weight=w)
    kl = kl_k3(logp_new, logp_ref)
    kl_seq = ((kl * mask).sum(1) / mask.sum(1)).mean().item()
    assert loss.item() - loss0.item() == pytest.approx(beta * kl_seq, abs=1e-6)
    assert stats["kl"] == pytest.approx((kl * mask).sum().item() / mask.sum().item(), abs=1e-6)


def test_weights_of_one_are_no_weights():
    g = torch.Generator().manual_seed(0)
    logp_new, logp_old = -torch.rand(2, 3, generator=g), -torch.rand(2, 3, generator=g)
    adv, mask = torch.tensor([0.7, -1.3]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    kw = {"logp_ref": -torch.rand(2, 3, generator=g), "beta": 0.04, "aggregation": "token_mean"}
    weighted, _ = grpo_loss(logp_new, logp_old, adv, mask, is_weight=torch.ones(2, 3), **kw)
    plain, _ = grpo_loss(logp_new, logp_old, adv, mask, **kw)
    assert weighted.item() == plain.item()


# ---- the trainer
def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


class OffsetSampler:
    """HF generate, then `sampler_logp` = the trainer's log-probs − offsets (token t of row i: offsets[(i + t) % 4]),
    NaN on the first token of row 0 (unknown), as a vLLM engine whose kernels differ would report them."""

    OFFSETS = (0.3, -0.2, 1.2, -0.05)  # exp(1.2) = 3.32 > cap 2: truncated

    def __init__(self, model, tok):
        self.hf, self.trainer = HFGenerateBackend(model, tok), None

    def generate(self, prompts, num_generations, sampling, **kw):
        r = self.hf.generate(prompts, num_generations, sampling, **kw)
        with torch.no_grad():
            logp = self.trainer.logprobs(self.trainer.engine.module, r, slice(None), False)[0]
        N, T = logp.shape
        self.delta = torch.tensor([[self.OFFSETS[(i + t) % 4] for t in range(T)] for i in range(N)])
        r.sampler_logp = logp - self.delta
        r.sampler_logp[0, 0] = NAN
        self.rollout = r
        return r


@pytest.mark.parametrize("correct, micro", [(True, None), (False, None), (True, 3)])
def test_trainer_logs_the_gap_and_weights_the_loss(tok, tiny_model, correct, micro):
    """Also in two micro-batches: π_old (the detached log-probs) and the weights are gathered across them."""
    dataset = [{"prompt": f"User: {p.question}\nAssistant:"} for p in make_problems("addition", 8, 1)]
    model = tiny_model(tok)
    backend = OffsetSampler(model, tok)
    cfg = GRPOConfig(prompts_per_step=2, num_generations=3, steps_per_iteration=1, beta=0.0, learning_rate=1e-3,
                     max_prompt_length=32, max_completion_length=8, rollout_backend="vllm",
                     vllm_importance_sampling=None if correct else False, micro_batch_size=micro)
    assert cfg.importance_sampling is correct
    seen = {}
    trainer = GRPOTrainer(model, tok, cfg, dataset, [("len", length_reward, 1.0)], backend=backend, progress=False,
                          callbacks=[lambda step, rollout, rewards, adv: seen.update(adv=adv)])
    backend.trainer = trainer
    (m,) = trainer.train()

    r, delta = backend.rollout, backend.delta
    known = r.completion_mask.bool()
    known[0, 0] = False
    d = delta[known]
    assert m["sampler/logp_diff_mean"] == pytest.approx(d.abs().mean().item(), abs=1e-5)
    assert m["sampler/logp_diff_max"] == pytest.approx(d.abs().max().item(), abs=1e-5)
    assert m["sampler/is_weight_mean"] == pytest.approx(d.exp().clamp(max=2.0).mean().item(), abs=1e-5)
    assert m["sampler/is_truncated_frac"] == pytest.approx((d > math.log(2.0)).float().mean().item(), abs=1e-6)
    assert 0 < m["sampler/is_truncated_frac"] < 1

    # μ = 1, β = 0: ratio 1, so each token's loss is −w_t·Â_i; sequence mean, then mean over completions
    w = torch.where(known, delta.exp().clamp(max=2.0), 1.0) if correct else torch.ones_like(delta)
    mask = r.completion_mask.float()
    expected = (-(seen["adv"].unsqueeze(1) * w * mask).sum(1) / mask.sum(1)).mean().item()
    assert m["loss"] == pytest.approx(expected, abs=1e-5)
    assert seen["adv"].abs().sum() > 0  # the loss was not trivially 0


def test_hf_rollouts_log_no_sampler_gap(tok, tiny_model):
    dataset = [{"prompt": f"User: {p.question}\nAssistant:"} for p in make_problems("addition", 8, 1)]
    cfg = GRPOConfig(prompts_per_step=2, num_generations=2, steps_per_iteration=1, beta=0.0,
                     max_prompt_length=32, max_completion_length=4)
    assert not cfg.importance_sampling
    (m,) = GRPOTrainer(tiny_model(tok), tok, cfg, dataset, [("len", length_reward, 1.0)], progress=False).train()
    assert not [k for k in m if k.startswith("sampler/")]


# ---- the vLLM backend
class FakeLogprobVLLM:
    """A `vllm` module whose engine returns given outputs (token ids, finish reasons, one {id: Logprob} per token)."""

    def __init__(self, outputs):
        fake = self
        self.outputs, self.llm_kwargs, self.params = outputs, None, []

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw
                model = NS(load_weights=lambda weights: None)
                self.llm_engine = NS(model_executor=NS(driver_worker=NS(model_runner=NS(model=model))))

            def generate(self, requests, sampling_params, use_tqdm=True):
                fake.params += sampling_params
                return [NS(outputs=[o]) for o in fake.outputs[: len(requests)]]

            def reset_prefix_cache(self):
                pass

        self.module = types.ModuleType("vllm")
        self.module.LLM = LLM
        self.module.SamplingParams = lambda **kw: NS(**kw)


def logprobs_of(ids, values, other=None):
    """vLLM's per-token logprobs: {sampled id: Logprob}, plus an unrelated entry to show the sampled one is picked."""
    return [{t: NS(logprob=v), **({other: NS(logprob=-9.0)} if other is not None and other != t else {})}
            for t, v in zip(ids, values)]


def test_vllm_backend_fills_sampler_logp_aligned_with_the_kept_tokens(tok, tiny_model, tmp_path, monkeypatch):
    from grpo.rollout_vllm import VLLMBackend

    eos = tok.eos_token_id
    tiny_model(tok).save_pretrained(tmp_path / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    outputs = [
        NS(token_ids=[7, 8, eos], finish_reason="stop", stop_reason=None,
           logprobs=logprobs_of([7, 8, eos], [-0.1, -0.2, -0.3], other=9)),
        NS(token_ids=[7, 9], finish_reason="stop", stop_reason=eos,  # the engine left the EOS out: appended, NaN
           logprobs=logprobs_of([7, 9], [-0.4, -0.5])),
        NS(token_ids=[5, eos, 6, 6], finish_reason="length", stop_reason=None,  # cut at the first EOS
           logprobs=logprobs_of([5, eos, 6, 6], [-0.6, -0.7, -0.8, -0.9])),
        NS(token_ids=[5, 5, 5, 5], finish_reason="length", stop_reason=None,  # truncated, all kept
           logprobs=logprobs_of([5, 5, 5, 5], [-1.0, -1.1, -1.2, -1.3])),
    ]
    fake = FakeLogprobVLLM(outputs)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    backend = VLLMBackend(policy, tok, max_prompt_length=32, max_completion_length=4)
    r = backend.generate(["User: 1+2=?\nAssistant:", "User: 3+4=?\nAssistant:"], 2, SamplingParams(max_new_tokens=4))
    assert fake.llm_kwargs["logprobs_mode"] == "processed_logprobs"
    assert all(p.logprobs == 0 for p in fake.params)
    assert r.lengths.tolist() == [3, 3, 2, 4]
    expected = [[-0.1, -0.2, -0.3, NAN], [-0.4, -0.5, NAN, NAN], [-0.6, -0.7, NAN, NAN], [-1.0, -1.1, -1.2, -1.3]]
    assert r.sampler_logp.shape == r.completion_ids.shape
    assert torch.allclose(r.sampler_logp, torch.tensor(expected), equal_nan=True)
    assert r.to("cpu").sampler_logp is not None


def test_hf_backend_reports_no_sampler_logp(tok, tiny_model):
    backend = HFGenerateBackend(tiny_model(tok), tok)
    r = backend.generate(["User: 1+2=?\nAssistant:"], 2, SamplingParams(max_new_tokens=3))
    assert r.sampler_logp is None


# ---- config
def test_config_refuses_the_correction_without_vllm_and_a_bad_cap():
    with pytest.raises(ValidationError, match="vllm_importance_sampling.*rollout_backend 'vllm'.*'hf'"):
        GRPOConfig(vllm_importance_sampling=True)
    assert GRPOConfig(vllm_importance_sampling=True, rollout_backend="vllm").importance_sampling
    assert GRPOConfig(rollout_backend="vllm").importance_sampling  # TRL's default: on with vLLM
    assert not GRPOConfig().importance_sampling
    for cap in (1.0, 0.5, float("inf")):
        with pytest.raises(ValidationError, match="vllm_importance_sampling_cap"):
            GRPOConfig(rollout_backend="vllm", vllm_importance_sampling_cap=cap)
