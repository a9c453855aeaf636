"""The GRPO objective, per token, from the log-probabilities of the chosen tokens only.

    loss_i,t = −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) + β·KL_t,    ρ = exp(logp_new − logp_old)

then aggregated over tokens and sequences. Clip-higher (DAPO), the aggregations and the KL estimators are options of
this one loss, not copies of it. Tokens sampled by another engine (vLLM) may weight the surrogate term by the
truncated importance weight w_t = min(π_old / π_sampler, C).
"""

from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref (unbiased, high variance, can be negative)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)² (biased, low variance)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref − new) − (ref − new) − 1 (unbiased, ≥ 0; the GRPO paper's estimator)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def clipped_surrogate(
    logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss: −min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â), per token.

    adv is (N,) (outcome: broadcast over tokens) or (N, T) (process). Also returns where the clip is active, i.e. where the
    gradient is cut: low = ρ < 1−ε_low with Â < 0, high = ρ > 1+ε_high with Â > 0.
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    clipped_low = (ratio < 1 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1 + eps_high) & (adv > 0)
    return per_token, clipped_low, clipped_high


def truncated_is_weight(logp_old: torch.Tensor, logp_sampler: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(exp(logp_old − logp_sampler), C) per token, detached (truncated importance sampling, as TRL and verl):
    the rollout was drawn from the sampler's π (vLLM's kernels), not the trainer's π_old. 1 where the sampler's
    log-prob is unknown (NaN)."""
    w = torch.exp(logp_old.detach().float() - logp_sampler.float()).clamp(max=cap)
    return torch.where(torch.isnan(logp_sampler), torch.ones_like(w), w)


def sampler_gap_stats(logp_old: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor,
                      cap: float) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's π_old, over the completion tokens whose sampler
    log-prob is known: mean and max |Δ|, the mean importance weight and the share of tokens whose weight is capped."""
    known = mask.bool() & ~torch.isnan(logp_sampler)
    diff = (logp_old.detach().float() - logp_sampler.float())[known]
    if diff.numel() == 0:  # every rank logs the same keys
        return {"sampler/logp_diff_mean": 0.0, "sampler/logp_diff_max": 0.0, "sampler/is_weight_mean": 1.0,
                "sampler/is_truncated_frac": 0.0}
    ratio = torch.exp(diff)
    return {
        "sampler/logp_diff_mean": diff.abs().mean().item(),
        "sampler/logp_diff_max": diff.abs().max().item(),
        "sampler/is_weight_mean": ratio.clamp(max=cap).mean().item(),
        "sampler/is_truncated_frac": (ratio > cap).float().mean().item(),
    }


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    max_len: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce (N, T) per-token values to a scalar over the masked tokens.

    sequence_mean: mean over each sequence's tokens, then over sequences (GRPO paper);
    token_mean:    sum over all tokens / number of tokens (DAPO);
    dr_grpo:       sum over all tokens / (N · max_len), a constant normaliser (Dr. GRPO).
    num_tokens overrides token_mean's denominator: on N ranks whose gradients are averaged, pass the mean token
    count per rank, so that the result is the token mean of the whole batch, not a mean of per-rank means.
    """
    total = torch.where(mask.bool(), per_token, 0.0)  # not a product: inf * 0 after EOS would be NaN
    mask = mask.to(per_token.dtype)
    if mode == "sequence_mean":
        return (total.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if mode == "token_mean":
        return total.sum() / (mask.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if mode == "dr_grpo":
        if max_len is None:
            raise ValueError("dr_grpo aggregation needs max_len (max_completion_length)")
        return total.sum() / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown aggregation {mode!r}; expected sequence_mean, token_mean or dr_grpo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(torch.float32)
    return (x.float() * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    logp_ref: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_estimator: str = "k3",
    aggregation: str = "sequence_mean",
    max_len: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (scalar) and its diagnostics (KL, clip fractions) as floats.

    is_weight: (N, T) per-token weights of the surrogate term (`truncated_is_weight`); the KL term is not weighted."""
    per_token, clipped_low, clipped_high = clipped_surrogate(logp_new, logp_old, adv, eps_low, eps_high)
    if is_weight is not None:
        per_token = per_token * is_weight
    stats = {}
    if beta > 0:
        if logp_ref is None:
            raise ValueError("beta > 0 needs the reference log-probs (logp_ref)")
        kl = KL_ESTIMATORS[kl_estimator](logp_new, logp_ref)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    loss = aggregate(per_token, mask, aggregation, max_len, num_tokens)
    stats["clip_low"] = masked_mean(clipped_low, mask).item()
    stats["clip_high"] = masked_mean(clipped_high, mask).item()
    return loss, stats
