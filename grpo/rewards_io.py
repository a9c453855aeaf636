"""Calling the reward functions the trainer was given, and checking what they return.

grpo never imports `rewards/`: a reward function is passed in as (name, callable, weight) with
`callable(prompts, completions, **columns)`, every list one entry per completion (dataset columns repeated G times).
Outcome mode: it returns one float per completion. Process mode: per completion a list of
(step end character offset into the completion text, step reward); the offset is exclusive, like `text[:offset]`.
A wrong length, a NaN or a malformed step fails at once, naming the function and showing one offending sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

RewardFunc = tuple[str, Callable, float]


class RewardError(ValueError):
    pass


def check_reward_funcs(reward_funcs: Sequence[RewardFunc]) -> None:
    if not reward_funcs:
        raise ValueError("at least one reward function is needed, as (name, callable, weight)")
    names = []
    for entry in reward_funcs:
        if not (isinstance(entry, tuple | list) and len(entry) == 3 and callable(entry[1])):
            raise ValueError(f"a reward function must be given as (name, callable, weight), got {entry!r}")
        name, _, weight = entry
        if not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"reward function {name!r}: weight must be a finite number, got {weight!r}")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"reward function names must be unique, got {names}")


def _sample(prompts, completions, i) -> str:
    return f"sample {i}: prompt={prompts[i][-200:]!r} completion={completions[i][:200]!r}"


def call_reward(name, fn, prompts: list[str], completions: list[str], columns: dict[str, list], mode: str) -> list:
    out = fn(prompts, completions, **columns)
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    out = list(out) if out is not None else None
    if out is None or len(out) != len(completions):
        got = "None" if out is None else f"{len(out)} values"
        raise RewardError(
            f"reward function {name!r} returned {got} for {len(completions)} completions; "
            f"{_sample(prompts, completions, 0)}"
        )
    for i, value in enumerate(out):
        if mode == "outcome":
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise RewardError(
                    f"reward function {name!r} returned {value!r} (not a finite number); {_sample(prompts, completions, i)}"
                )
        else:
            try:
                steps = [(int(c), float(r)) for c, r in value]
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward function {name!r} (process mode) must return a list of (char_offset, reward) per "
                    f"completion, got {value!r}; {_sample(prompts, completions, i)}"
                ) from None
            for c, r in steps:
                if not math.isfinite(r) or not 0 <= c <= len(completions[i]):
                    raise RewardError(
                        f"reward function {name!r} returned step ({c}, {r}): reward must be finite and the offset within "
                        f"[0, {len(completions[i])}]; {_sample(prompts, completions, i)}"
                    )
            out[i] = steps
    return out


def char_offsets_to_token_ends(
    tokenizer, completion_ids: torch.Tensor, length: int, offsets: Sequence[int]
) -> list[int]:
    """Map step-end character offsets (exclusive) of a decoded completion to the index of the token holding the step's
    last character: the first token k whose decoded prefix ids[:k+1] reaches the offset.

    Decoding prefixes (not summing per-token strings) keeps byte-level BPE right where one character spans tokens.
    """
    if not offsets:
        return []
    ids = completion_ids[:length].tolist()
    prefixes = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
    # a prefix that ends inside a multi-byte character decodes with a trailing U+FFFD: not a whole character yet
    prefix_lens = [len(t.rstrip("\ufffd")) for t in prefixes]
    ends = []
    for off in offsets:
        k = next((k for k, n in enumerate(prefix_lens) if n >= off), len(ids) - 1)
        ends.append(max(k, 0))
    return ends
