"""Calling the reward functions the trainer was given, and checking what they return: the one place that does.

grpo never imports `rewards/`: a reward function is passed in as (name, callable, weight) with
`callable(prompts, completions, **columns)`, every list one entry per completion (dataset columns repeated G times).
An outcome reward returns one float per completion. A process reward (the callable has `.process = True`) returns per
completion a list of (step end character offset into the completion text, step reward); the offset is exclusive, like
`text[:offset]`, and offsets do not decrease. A reward that raises, a wrong length, a NaN or a malformed step fails at
once with a `RewardError` naming the function and showing the offending sample (found by bisection when it raised).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

RewardFunc = tuple[str, Callable, float]


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and shows the sample."""

    def __init__(
        self, name: str, message: str, index: int | None = None, prompt: str | None = None, completion: str | None = None
    ):
        self.name, self.index, self.prompt, self.completion = name, index, prompt, completion
        text = f"reward {name!r}: {message}"
        if index is not None:
            text += f"\n  sample {index}:\n    prompt: {shorten(prompt)!r}\n    completion: {shorten(completion)!r}"
        super().__init__(text)


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut in the middle to about `limit` characters, for error messages."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ...[{len(text) - 2 * half} chars]... {text[-half:]}"


def is_process_reward(fn: Callable) -> bool:
    """True for rewards that return (step end offset, reward) pairs per completion instead of one float."""
    return bool(getattr(fn, "process", False))


def check_reward_funcs(reward_funcs: Sequence[RewardFunc], advantage_mode: str = "outcome") -> None:
    """Refuse a malformed reward list, and rewards that do not fit `advantage_mode`: a process reward's steps would be
    lost to outcome supervision; process supervision needs at least one process reward (outcome rewards join it as
    one step ending the completion)."""
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
    process = [name for name, fn, _ in reward_funcs if is_process_reward(fn)]
    if advantage_mode == "outcome" and process:
        raise ValueError(
            f"advantage_mode 'outcome' cannot use process rewards (one reward per step): {process}; "
            "set advantage_mode: process or drop them"
        )
    if advantage_mode == "process" and not process:
        raise ValueError(
            f"advantage_mode 'process' needs at least one process reward (one reward per step), got only outcome "
            f"rewards {names}; set advantage_mode: outcome or add one (e.g. process_arithmetic)"
        )


def _rows(columns: dict[str, list], idx: Sequence[int]) -> dict[str, list]:
    return {k: [v[i] for i in idx] for k, v in columns.items()}


def _locate(fn: Callable, prompts, completions, columns, idx: list[int], budget: int = 24) -> int | None:
    """Bisect to one sample on which `fn` raises by itself (at most `budget` extra calls), or None."""
    while len(idx) > 1 and budget > 0:
        half = len(idx) // 2
        for part in (idx[:half], idx[half:]):
            budget -= 1
            try:
                fn([prompts[i] for i in part], [completions[i] for i in part], **_rows(columns, part))
            except Exception:  # noqa: BLE001 - any failure locates the sample; the original error is re-raised
                idx = part
                break
        else:
            return None  # fails only on the whole batch
    return idx[0] if len(idx) == 1 else None


def _check_value(name: str, v: Any, i: int, process: bool, prompts, completions):
    def fail(msg):
        raise RewardError(name, msg, i, prompts[i], completions[i])

    if process:
        if not isinstance(v, list | tuple):
            fail(f"a process reward must give a list of (end offset, reward) per completion, got {type(v).__name__}")
        last, n = 0, len(completions[i])
        for step in v:
            if not (isinstance(step, list | tuple) and len(step) == 2):
                fail(f"step {step!r} is not an (end offset, reward) pair")
            end, r = step
            if not hasattr(end, "__index__") or not last <= end <= n:
                fail(f"step end {end!r} is not an offset in [{last}, {n}] (offsets must not decrease)")
            _check_value(name, r, i, False, prompts, completions)
            last = end
        return [(int(e), float(r)) for e, r in v]
    if v is None or isinstance(v, str | bytes) or not hasattr(v, "__float__"):
        fail(f"returned {v!r} ({type(v).__name__}), not a float")
    f = float(v)
    if not math.isfinite(f):
        fail(f"returned {f} (rewards must be finite)")
    return f


def call_reward(name: str, fn: Callable, prompts: list[str], completions: list[str], /, **columns) -> list:
    """Run reward `fn` on a batch, check its output (one finite float per completion, or one list of (offset, reward)
    per completion for a process reward) and raise `RewardError` with the reward's name and the offending sample.
    `columns` go to `fn` by name (positional-only parameters: a column may be called `name` or `fn`)."""
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(name, f"{len(prompts)} prompts for {n} completions")
    for k, v in columns.items():
        if not isinstance(v, list | tuple) or len(v) != n:
            got = len(v) if isinstance(v, list | tuple) else type(v).__name__
            raise RewardError(name, f"column {k!r} must be a list aligned with the {n} completions (got {got})")
    try:
        out = fn(prompts, completions, **columns)
    except Exception as e:
        i = _locate(fn, prompts, completions, columns, list(range(n)))
        sample = (i, prompts[i], completions[i]) if i is not None else (None, None, None)
        raise RewardError(name, f"raised {type(e).__name__}: {e}", *sample) from e
    if not isinstance(out, list | tuple) and not hasattr(out, "tolist"):
        raise RewardError(name, f"returned {type(out).__name__}, expected a list of {n} values")
    out = out.tolist() if hasattr(out, "tolist") else list(out)
    if len(out) != n:
        raise RewardError(name, f"returned {len(out)} values for {n} completions")
    process = is_process_reward(fn)
    return [_check_value(name, v, i, process, prompts, completions) for i, v in enumerate(out)]


def decoded_prefix_lengths(tokenizer, ids: list[int]) -> list[int]:
    """len(decode(ids[:k+1])) for every k, without a trailing U+FFFD (a prefix ending inside a multi-byte character
    does not hold that character yet), in linear time: incremental decoding as in vLLM. Each new token is decoded with
    the few tokens before it (`start`: where the last whole piece of text began), and the text it adds is the
    difference to the context alone, which keeps word-initial spaces and byte-level BPE right."""
    lens, total, start, read, context = [], 0, 0, 0, 0
    for k in range(len(ids)):
        text = tokenizer.decode(ids[start : k + 1], skip_special_tokens=True)
        if len(text) > context and not text.endswith("\ufffd"):
            total += len(text) - context
            start, read = read, k + 1
            context = len(tokenizer.decode(ids[start:read], skip_special_tokens=True))
        lens.append(total)
    return lens


def char_offsets_to_token_ends(tokenizer, completion_ids, length: int, offsets: Sequence[int]) -> list[int]:
    """Map step-end character offsets (exclusive) of a decoded completion to the index of the token holding the step's
    last character: the first token k whose decoded prefix ids[:k+1] reaches the offset."""
    if not offsets:
        return []
    prefix_lens = decoded_prefix_lengths(tokenizer, completion_ids[:length].tolist())
    return [max(min(bisect.bisect_left(prefix_lens, off), length - 1), 0) for off in offsets]
