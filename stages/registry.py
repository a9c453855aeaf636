"""The stages of the R1 recipe by name: the only module that imports every stage.

Stage names, order and inputs are in stages.core.order (a leaf the recipe schema and the flows read too).
"""

from __future__ import annotations

from collections.abc import Callable

from grpo.distributed import is_main
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
from stages.core.lineage import record_outputs
from stages.core.preflight import preflight

STAGES: dict[str, Callable] = {"base_model": base_model.run, "r1_zero": r1_zero.run,
                               "cold_start_sft": cold_start_sft.run, "reasoning_rl": reasoning_rl.run,
                               "synthesize": synthesize.run, "general_sft": general_sft.run,
                               "preference_rl": preference_rl.run, "distill": distill.run}


def runnable() -> dict[str, Callable]:
    """name -> run(recipe, inputs=None, parent_run_id=None, progress=True) -> outputs dict (URIs)."""
    return {name: _recording(name, fn) for name, fn in STAGES.items()}


def _recording(name: str, run: Callable) -> Callable:
    """A stage's run that first passes preflight (no model loaded yet), then tags its MLflow run with the outputs it
    returned (what a later pipeline run reuses)."""

    def recorded(recipe, inputs=None, parent_run_id=None, progress=True):
        preflight(recipe, [name], inputs)
        out = run(recipe, inputs=inputs, parent_run_id=parent_run_id, progress=progress)
        if is_main():  # on several ranks, rank 0 alone writes to MLflow
            record_outputs(recipe, out)
        return out

    return recorded
