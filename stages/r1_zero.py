"""R1-Zero: pure RL from the base model, no SFT. Accuracy + format rewards on the R1-Zero template."""

from __future__ import annotations

from stages.core.grpo_runner import run_stage
from stages.core.recipe import Recipe

STAGE = "r1_zero"
UPSTREAM = {"model": ("base_model", "model")}


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    return run_stage(STAGE, recipe.r1_zero, UPSTREAM["model"][0], recipe, inputs, parent_run_id, progress)
