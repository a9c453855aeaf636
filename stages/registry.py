"""The stages of the R1 recipe, in pipeline order, and the ones that can run today."""

from __future__ import annotations

from collections.abc import Callable

ORDER = ["base_model", "r1_zero", "cold_start_sft", "reasoning_rl", "synthesize", "general_sft", "preference_rl",
         "distill"]


def runnable() -> dict[str, Callable]:
    """name -> run(recipe, inputs=None, parent_run_id=None, progress=True) -> outputs dict (URIs)."""
    from stages import base_model, r1_zero, reasoning_rl

    return {"base_model": base_model.run, "r1_zero": r1_zero.run, "reasoning_rl": reasoning_rl.run}


def check_stages(names: list[str]) -> list[str]:
    """Validate a sub-chain before anything starts; returns it in pipeline order."""
    available = runnable()
    for n in names:
        if n not in ORDER:
            raise ValueError(f"unknown stage {n!r}; stages: {ORDER}")
        if n not in available:
            raise ValueError(f"stage {n!r} is not implemented yet; runnable stages: {list(available)}")
    return [s for s in ORDER if s in names]
