"""R1-Zero: pure RL from the base model, no SFT. Accuracy + format rewards on the R1-Zero template."""

from __future__ import annotations

from stages.common import resolve_input, stage_context
from stages.recipe import Recipe

STAGE = "r1_zero"
UPSTREAM = {"model": ("base_model", "model")}


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    from stages.grpo_stage import reward_functions, train_grpo, train_rows
    from stages.models import load_model_and_tokenizer, pick_device

    cfg = recipe.r1_zero
    model_uri = resolve_input(recipe, inputs, "model", *UPSTREAM["model"])
    rewards = reward_functions(recipe, cfg)  # a bad reward spec fails before any model loads
    rows = train_rows(recipe, cfg)
    with stage_context(recipe, STAGE, cfg, {"model": model_uri}, parent_run_id, progress) as ctx:
        model, tok = load_model_and_tokenizer(model_uri, pick_device(recipe.device),
                                              recipe.base_model.trust_remote_code)
        return train_grpo(ctx, cfg, model, tok, rows, rewards)
