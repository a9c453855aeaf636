"""The pipeline flow: the R1 stages chained as Prefect tasks, one MLflow parent run per pipeline run.

Stages hand work on as URIs (runs:/<id>/model). Stages not yet built are listed in PLANNED and refused by name.
"""

from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger, task

from stages import base_model, tracking
from stages.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

# Stage order of the R1 recipe; only the ones in STAGES run today.
ORDER = ["base_model", "r1_zero", "cold_start_sft", "reasoning_rl", "synthesize", "general_sft", "preference_rl",
         "distill"]
STAGES = {"base_model": base_model.run}
PLANNED = [s for s in ORDER if s not in STAGES]


def check_stages(names: list[str]) -> list[str]:
    """Validate a sub-chain before anything starts; returns it in pipeline order."""
    for n in names:
        if n not in ORDER:
            raise ValueError(f"unknown stage {n!r}; stages: {ORDER}")
        if n not in STAGES:
            raise ValueError(f"stage {n!r} is not implemented yet; runnable stages: {list(STAGES)}")
    return [s for s in ORDER if s in names]


@task(name="stage", retries=1, retry_delay_seconds=5, task_run_name="{name}")
def run_stage(name: str, recipe: Recipe, parent_run_id: str) -> dict[str, str]:
    get_run_logger().info("stage %s starting", name)
    out = STAGES[name](recipe, parent_run_id=parent_run_id, progress=False)
    get_run_logger().info("stage %s finished: %s", name, out)
    return out


@flow(name="r1-pipeline", log_prints=True)
def r1_pipeline(recipe: str = "tiny", stages: list[str] | None = None, overrides: dict | None = None) -> dict:
    """Run the R1 chain (or a sub-chain) from a recipe preset name or YAML path."""
    cfg = load_recipe(recipe, overrides)
    chain = check_stages(stages or list(STAGES))
    tracking.check_tracking(cfg.tracking)
    import mlflow

    exp_id = tracking.setup(cfg.tracking)
    outputs: dict[str, dict] = {}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"pipeline-{cfg.name}",
                          tags={tracking.RECIPE_TAG: cfg.name, tracking.STAGE_TAG: "pipeline"}) as parent:
        for name in chain:
            outputs[name] = run_stage(name, cfg, parent.info.run_id)
    return {"pipeline_run_id": parent.info.run_id, "stages": outputs}


def configure_local_prefect() -> None:
    """Serverless local Prefect: a temporary server per run, no telemetry (no network here)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
