"""Reasoning RL: GRPO from the cold-start model with accuracy + format + language consistency (R1 §2.3.2)."""

from __future__ import annotations

from stages.core.grpo_runner import run_stage
from stages.core.recipe import Recipe

STAGE = "reasoning_rl"
UPSTREAM = {"model": ("cold_start_sft", "model")}


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    return run_stage(STAGE, recipe.reasoning_rl, UPSTREAM["model"][0], recipe, inputs, parent_run_id, progress)
