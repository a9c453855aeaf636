"""Reward functions by name, built from config, and a checked way to call them.

`build_rewards([{"name": "accuracy"}, {"name": "format", "weight": 0.5}])` -> [(name, fn, weight), ...] with each spec's
params bound; a typo in a name or a param fails at build time, naming it. `call_reward` runs one reward function on a
batch and turns any failure into a `RewardError` that names the reward and shows the offending sample.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rewards.accuracy import accuracy_reward
from rewards.code import code_tests_reward
from rewards.format import format_reward, soft_format_reward
from rewards.language import language_consistency_reward
from rewards.length import cosine_length_reward, overlong_reward, repetition_penalty_reward
from rewards.parsing import shorten
from rewards.process import process_arithmetic_reward

RewardFn = Callable[..., list]


class RewardSpec(BaseModel):
    """One reward of a stage: which function, its weight in the sum, and its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    weight: float = Field(1.0, allow_inf_nan=False)
    params: dict[str, Any] = Field(default_factory=dict)


# Per-call arguments a reward receives from the engine, never from a spec's params.
_CALL_ARGS = {"prompts", "completions", "answer", "task", "metadata"}


def _bind(name: str, fn: Callable, process: bool = False) -> Callable[..., RewardFn]:
    """A factory binding `params` to `fn` with functools.partial. Fails at build time, naming the param, on a param `fn`
    does not declare, a value of the wrong type (checked against its annotation), or a value `fn` itself rejects (a dry
    run on an empty batch)."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    allowed = [
        p for p, v in sig.parameters.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p not in _CALL_ARGS
    ]

    def factory(**params) -> RewardFn:
        checked = {}
        for p, value in params.items():
            if p not in allowed:
                raise ValueError(f"unknown param {p!r} for reward {name!r}; known params: {sorted(allowed)}")
            try:
                checked[p] = TypeAdapter(hints[p]).validate_python(value) if p in hints else value
            except ValidationError as e:
                raise ValueError(f"reward {name!r}, param {p!r}: {e.errors()[0]['msg']} (got {value!r})") from None
        bound = functools.partial(fn, **checked)
        bound.process = process
        try:
            bound([], [], **{c: [] for c in _CALL_ARGS - {"prompts", "completions"}})
        except ValueError as e:
            raise ValueError(f"reward {name!r}: {e}") from None
        return bound

    factory.allowed_params = allowed
    return factory


def _reward_model(**params) -> RewardFn:
    from rewards.reward_model import RewardModelScorer  # lazy: imports transformers, only when asked for

    allowed = [p for p in inspect.signature(RewardModelScorer.__init__).parameters if p != "self"]
    for p in params:
        if p not in allowed:
            raise ValueError(f"unknown param {p!r} for reward reward_model; known params: {sorted(allowed)}")
    if "path" not in params:
        raise ValueError("reward reward_model needs param 'path' (a saved sequence-classification model)")
    return RewardModelScorer(**params)


REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "accuracy": _bind("accuracy", accuracy_reward),
    "format": _bind("format", format_reward),
    "soft_format": _bind("soft_format", soft_format_reward),
    "language_consistency": _bind("language_consistency", language_consistency_reward),
    "overlong": _bind("overlong", overlong_reward),
    "cosine_length": _bind("cosine_length", cosine_length_reward),
    "repetition": _bind("repetition", repetition_penalty_reward),
    "reward_model": _reward_model,
    "process_arithmetic": _bind("process_arithmetic", process_arithmetic_reward, process=True),
    "code_tests": _bind("code_tests", code_tests_reward),  # runs model output: in a locked-down subprocess
}


def build_rewards(specs: Sequence[RewardSpec | dict]) -> list[tuple[str, RewardFn, float]]:
    """(name, bound reward function, weight) per spec; unknown names and params fail here, naming them."""
    out = []
    for raw in specs:
        spec = raw if isinstance(raw, RewardSpec) else RewardSpec.model_validate(raw)
        if spec.name not in REGISTRY:
            raise ValueError(f"unknown reward {spec.name!r}; known rewards: {sorted(REGISTRY)}")
        out.append((spec.name, REGISTRY[spec.name](**spec.params), spec.weight))
    return out


def is_process_reward(fn: RewardFn) -> bool:
    """True for rewards that return (step end offset, reward) pairs per completion instead of one float."""
    return bool(getattr(fn, "process", False))


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and shows the sample."""

    def __init__(
        self,
        name: str,
        message: str,
        index: int | None = None,
        prompt: str | None = None,
        completion: str | None = None,
    ):
        self.name, self.index, self.prompt, self.completion = name, index, prompt, completion
        text = f"reward {name!r}: {message}"
        if index is not None:
            text += f"\n  sample {index}:\n    prompt: {shorten(prompt)!r}\n    completion: {shorten(completion)!r}"
        super().__init__(text)


def _row(columns: dict[str, list], idx: Sequence[int]) -> dict[str, list]:
    return {k: [v[i] for i in idx] for k, v in columns.items()}


def _locate(fn: RewardFn, prompts, completions, columns, idx: list[int], budget: list[int]) -> int | None:
    """Bisect to one sample on which `fn` raises by itself (at most ~2 log2(n) extra calls), or None."""
    while len(idx) > 1 and budget[0] > 0:
        half = len(idx) // 2
        for part in (idx[:half], idx[half:]):
            budget[0] -= 1
            try:
                fn([prompts[i] for i in part], [completions[i] for i in part], **_row(columns, part))
            except Exception:  # noqa: BLE001 - any failure locates the sample; the original error is re-raised
                idx = part
                break
        else:
            return None  # fails only on the whole batch
    return idx[0] if len(idx) == 1 else None


def _check_value(name: str, v: Any, i: int, completion: str, process: bool, prompts, completions):
    def fail(msg):
        raise RewardError(name, msg, i, prompts[i], completions[i])

    if process:
        if not isinstance(v, (list, tuple)):
            fail(f"a process reward must give a list of (end offset, reward) per completion, got {type(v).__name__}")
        last = 0
        for step in v:
            if not (isinstance(step, (list, tuple)) and len(step) == 2):
                fail(f"step {step!r} is not an (end offset, reward) pair")
            end, r = step
            if not hasattr(end, "__index__") or not last <= end <= len(completion):
                fail(f"step end {end!r} is not an offset in [{last}, {len(completion)}] (offsets must not decrease)")
            _check_value(name, r, i, completion, False, prompts, completions)
            last = end
        return [(int(e), float(r)) for e, r in v]
    if v is None or isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
        fail(f"returned {v!r} ({type(v).__name__}), not a float")
    f = float(v)
    if not math.isfinite(f):
        fail(f"returned {f} (rewards must be finite)")
    return f


def call_reward(name: str, fn: RewardFn, prompts: list[str], completions: list[str], **columns) -> list:
    """Run reward `fn` on a batch, check its output (one finite float per completion, or one list of (offset, reward)
    per completion for a process reward) and raise `RewardError` with the reward's name and the offending sample."""
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(name, f"{len(prompts)} prompts for {n} completions")
    for k, v in columns.items():
        if not isinstance(v, (list, tuple)) or len(v) != n:
            got = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
            raise RewardError(name, f"column {k!r} must be a list aligned with the {n} completions (got {got})")
    try:
        out = fn(prompts, completions, **columns)
    except Exception as e:
        i = _locate(fn, prompts, completions, columns, list(range(n)), [24])
        sample = (i, prompts[i], completions[i]) if i is not None else (None, None, None)
        raise RewardError(name, f"raised {type(e).__name__}: {e}", *sample) from e
    if not isinstance(out, (list, tuple)) and not hasattr(out, "tolist"):
        raise RewardError(name, f"returned {type(out).__name__}, expected a list of {n} values")
    out = out.tolist() if hasattr(out, "tolist") else list(out)
    if len(out) != n:
        raise RewardError(name, f"returned {len(out)} values for {n} completions")
    process = is_process_reward(fn)
    return [_check_value(name, v, i, completions[i], process, prompts, completions) for i, v in enumerate(out)]
