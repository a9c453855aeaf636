"""The stages of the R1 recipe in pipeline order, and what each takes from the ones before it.

A leaf: the recipe schema, preflight, the registry and the flows all read it, and it imports nothing of theirs.
"""

from __future__ import annotations

ORDER = ["base_model", "r1_zero", "cold_start_sft", "reasoning_rl", "synthesize", "general_sft", "preference_rl",
         "distill"]


# Each stage's inputs: name -> (upstream stage, the upstream output it takes). A pipeline run passes the upstream's
# output from this run; a single-stage rerun resolves it to the newest finished upstream run in MLflow.
INPUTS: dict[str, dict[str, tuple[str, str]]] = {
    "base_model": {},
    "r1_zero": {"model": ("base_model", "model")},
    "cold_start_sft": {"model": ("base_model", "model"), "r1_zero_model": ("r1_zero", "model")},
    "reasoning_rl": {"model": ("cold_start_sft", "model")},
    "synthesize": {"model": ("reasoning_rl", "model")},
    "general_sft": {"model": ("base_model", "model"), "data": ("synthesize", "data")},
    "preference_rl": {"model": ("general_sft", "model")},
    "distill": {"data": ("synthesize", "data"), "teacher": ("preference_rl", "model")},
}


def inputs_of(recipe, stage: str) -> dict[str, tuple[str, str]]:
    """INPUTS[stage] as this recipe configures the stage: cold-start SFT on a given CoT set takes no R1-Zero model."""
    inputs = dict(INPUTS[stage])
    if stage == "cold_start_sft" and recipe.cold_start_sft.data is not None:
        inputs.pop("r1_zero_model")
    return inputs


def pipeline_inputs(recipe, stage: str, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
    """The inputs of `stage` that upstream stages of this pipeline run produced."""
    return {key: outputs[up][art] for key, (up, art) in inputs_of(recipe, stage).items()
            if up in outputs and art in outputs[up]}


def check_stages(names: list[str]) -> list[str]:
    """Validate a sub-chain before anything starts; returns it in pipeline order."""
    for n in names:
        if n not in ORDER:
            raise ValueError(f"unknown stage {n!r}; stages: {ORDER}")
    return [s for s in ORDER if s in names]
