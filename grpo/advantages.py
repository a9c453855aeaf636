"""Advantages: how much better a completion (or a reasoning step) is than its group.

Rows are grouped consecutively: group g = rows g*G .. g*G+G-1 (see grpo.rollout).
The std is the unbiased sample std (torch's default, as in TRL). A group whose rewards are all equal carries no signal:
its advantages are exactly 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from grpo.distributed import all_reduce_sum

EPS = 1e-4  # added to a std, as in TRL, so that a nearly-constant group does not explode
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def batch_std(values: torch.Tensor, all_reduce: AllReduce = all_reduce_sum) -> torch.Tensor:
    """The unbiased std of the whole batch's values, over every rank: the moments (count, sum, sum of squares) are
    summed over ranks, so N ranks divide by the std one process would compute on all the values. 0 for < 2 values."""
    x = values.double().flatten()
    n, s, ss = all_reduce(torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), (x * x).sum()]))
    if n < 2:
        return torch.tensor(0.0)
    return ((ss - s * s / n) / (n - 1)).clamp_min(0).sqrt().float()


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group", all_reduce: AllReduce = all_reduce_sum
                     ) -> torch.Tensor:
    """Outcome supervision: Â_i = (r_i − mean(r_group)) / std(r_group), one value per completion.

    rewards: (N,) with N = num_groups * G. scale: "group" (the formula above), "batch" (divide by the std of all the
    step's rewards, on every rank: `batch_std`; centring still per group) or "none" (centre only, Dr. GRPO).
    Returns (N,); broadcast it over the tokens.
    """
    r = rewards.float().view(-1, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (r.std(dim=1, keepdim=True) + EPS)
    elif scale == "batch":
        adv = centred / (batch_std(r, all_reduce) + EPS)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    constant = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values
    return adv.masked_fill(constant, 0.0).view(-1)


def process_advantages(
    step_rewards: Sequence[Sequence[float]],
    step_token_ends: Sequence[Sequence[int]],
    G: int,
    completion_len: int,
    scale: str = "group",
    all_reduce: AllReduce = all_reduce_sum,
) -> torch.Tensor:
    """Process supervision: each reasoning step j of completion i has a reward r_ij, ending at token index e_ij.

    Every step reward is normalised over all steps of the group, r̃ = (r − mean(R_group)) / std(R_group), and a token's
    advantage is the sum of r̃ over the steps that end at or after it: Â_i,t = Σ_{j : e_ij ≥ t} r̃_ij.
    Tokens after the last step get 0. Returns (N, completion_len).
    """
    N = len(step_rewards)
    if len(step_token_ends) != N or N % G:
        raise ValueError(f"need one step list per completion and N divisible by G (N={N}, G={G})")
    all_steps = [float(x) for steps in step_rewards for x in steps]
    step_std = batch_std(torch.tensor(all_steps), all_reduce).item() if scale == "batch" else None  # every rank's
    adv = torch.zeros(N, completion_len)
    for g in range(N // G):
        rows = range(g * G, (g + 1) * G)
        R = torch.tensor([float(x) for i in rows for x in step_rewards[i]])
        if len(R) == 0 or R.max() == R.min():
            continue  # no steps, or all equal: no signal
        std = {"group": R.std().item() if len(R) > 1 else 0.0, "batch": step_std, "none": None}[scale]
        mean = R.mean().item()
        for i in rows:
            if len(step_rewards[i]) != len(step_token_ends[i]):
                raise ValueError(
                    f"completion {i}: {len(step_rewards[i])} step rewards but {len(step_token_ends[i])} step ends"
                )
            for r, end in zip(step_rewards[i], step_token_ends[i]):
                r_norm = (r - mean) if std is None else (r - mean) / (std + EPS)
                adv[i, : min(end, completion_len - 1) + 1] += r_norm
    return adv
