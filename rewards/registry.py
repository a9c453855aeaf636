"""Reward functions by name, built from config.

`build_rewards([{"name": "accuracy"}, {"name": "format", "weight": 0.5}])` -> [(name, fn, weight), ...] with each spec's
params bound; a typo in a name or a param fails at build time, naming it. A process reward (one reward per reasoning
step) carries `.process = True`. Calling them and checking what they return is the consumer's: grpo.rewards_io.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rewards.accuracy import accuracy_reward
from rewards.code import code_tests_reward
from rewards.format import format_reward, soft_format_reward
from rewards.language import language_consistency_reward
from rewards.length import cosine_length_reward, overlong_reward, repetition_penalty_reward
from rewards.process import process_arithmetic_reward

RewardFn = Callable[..., list]


class RewardSpec(BaseModel):
    """One reward of a stage: which function, its weight in the sum, and its parameters."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

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
