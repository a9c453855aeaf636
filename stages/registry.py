"""The stages of the R1 recipe, in pipeline order, and the ones that can run today."""

from __future__ import annotations

from collections.abc import Callable

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


def runnable() -> dict[str, Callable]:
    """name -> run(recipe, inputs=None, parent_run_id=None, progress=True) -> outputs dict (URIs)."""
    from stages import (
        base_model,
        cold_start_sft,
        distill,
        general_sft,
        preference_rl,
        r1_zero,
        reasoning_rl,
        synthesize,
    )

    stages = {"base_model": base_model.run, "r1_zero": r1_zero.run, "cold_start_sft": cold_start_sft.run,
              "reasoning_rl": reasoning_rl.run, "synthesize": synthesize.run, "general_sft": general_sft.run,
              "preference_rl": preference_rl.run, "distill": distill.run}
    return {name: _recording(name, fn) for name, fn in stages.items()}


def _recording(name: str, run: Callable) -> Callable:
    """A stage's run that first passes preflight (no model loaded yet), then tags its MLflow run with the outputs it
    returned (what a later pipeline run reuses)."""

    def recorded(recipe, inputs=None, parent_run_id=None, progress=True):
        from grpo.distributed import is_main
        from stages.common import record_outputs
        from stages.preflight import preflight

        preflight(recipe, [name], inputs)
        out = run(recipe, inputs=inputs, parent_run_id=parent_run_id, progress=progress)
        if is_main():  # on several ranks, rank 0 alone writes to MLflow
            record_outputs(recipe, out)
        return out

    return recorded


def check_stages(names: list[str]) -> list[str]:
    """Validate a sub-chain before anything starts; returns it in pipeline order."""
    available = runnable()
    for n in names:
        if n not in ORDER:
            raise ValueError(f"unknown stage {n!r}; stages: {ORDER}")
        if n not in available:
            raise ValueError(f"stage {n!r} is not implemented yet; runnable stages: {list(available)}")
    return [s for s in ORDER if s in names]
