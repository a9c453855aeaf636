"""The pipeline flow: the R1 stages chained as Prefect tasks, one MLflow parent run per pipeline run.

Stages hand work on as URIs (runs:/<id>/model). Stages not yet built are refused by name before anything starts.
"""

from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger, task

from stages import tracking
from stages.recipe import Recipe, load_recipe
from stages.registry import check_stages, runnable

log = logging.getLogger(__name__)


@task(name="stage", retries=1, retry_delay_seconds=5, task_run_name="{name}")
def run_stage(name: str, recipe: Recipe, parent_run_id: str) -> dict[str, str]:
    get_run_logger().info("stage %s starting", name)
    out = runnable()[name](recipe, parent_run_id=parent_run_id, progress=False)
    get_run_logger().info("stage %s finished: %s", name, out)
    return out


@flow(name="r1-pipeline", log_prints=True)
def r1_pipeline(recipe: str = "tiny", stages: list[str] | None = None, overrides: dict | None = None) -> dict:
    """Run the R1 chain (or a sub-chain) from a recipe preset name or YAML path."""
    cfg = load_recipe(recipe, overrides)
    chain = check_stages(stages or list(runnable()))
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
