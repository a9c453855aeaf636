"""Advantages: how much better a completion (or a reasoning step) is than its group.

Rows are grouped consecutively: group g = rows g*G .. g*G+G-1 (see grpo.rollout).
The std is the unbiased sample std (torch's default, as in TRL). A group whose rewards are all equal carries no signal:
its advantages are exactly 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-4  # added to a std, as in TRL, so that a nearly-constant group does not explode


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group") -> torch.Tensor:
    """Outcome supervision: Â_i = (r_i − mean(r_group)) / std(r_group), one value per completion.

    rewards: (N,) with N = num_groups * G. scale: "group" (the formula above), "batch" (divide by the std of all N
    rewards, centring still per group) or "none" (centre only, Dr. GRPO). Returns (N,); broadcast it over the tokens.
    """
    r = rewards.float().view(-1, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (r.std(dim=1, keepdim=True) + EPS)
    elif scale == "batch":
        adv = centred / (r.std() + EPS)
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
    batch_std = torch.tensor(all_steps).std().item() if len(all_steps) > 1 else 0.0
    adv = torch.zeros(N, completion_len)
    for g in range(N // G):
        rows = range(g * G, (g + 1) * G)
        R = torch.tensor([float(x) for i in rows for x in step_rewards[i]])
        if len(R) == 0 or R.max() == R.min():
            continue  # no steps, or all equal: no signal
        std = {"group": R.std().item() if len(R) > 1 else 0.0, "batch": batch_std, "none": None}[scale]
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
