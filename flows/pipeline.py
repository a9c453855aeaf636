"""The pipeline flow: the R1 stages chained as Prefect tasks, one MLflow parent run per pipeline run.

Stages hand work on as URIs (runs:/<id>/model). Stages not yet built are refused by name before anything starts.
"""

from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger, task

from flows.launch import LaunchSpec, launch_stage
from stages import tracking
from stages.recipe import Recipe, load_recipe
from stages.registry import check_stages, pipeline_inputs, runnable

log = logging.getLogger(__name__)


@task(name="stage", retries=1, retry_delay_seconds=5, task_run_name="{name}")
def run_stage(name: str, recipe: Recipe, parent_run_id: str, inputs: dict[str, str]) -> dict[str, str]:
    """One stage, launched the way the recipe's `cluster` says (in-process, torchrun, DeepSpeed, Slurm, Kubernetes).
    A retry reruns the same stage key, so it resumes from the checkpoints the failed attempt left."""
    logger = get_run_logger()
    logger.info("stage %s starting with inputs %s", name, inputs)
    out = launch_stage(name, recipe, None, parent_run_id, LaunchSpec.from_cluster(recipe.cluster), log=logger.info,
                       inputs=inputs)
    logger.info("stage %s finished: %s", name, out)
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
            outputs[name] = run_stage(name, cfg, parent.info.run_id, pipeline_inputs(name, outputs))
    return {"pipeline_run_id": parent.info.run_id, "stages": outputs}


def configure_local_prefect() -> None:
    """Serverless local Prefect: a temporary server per run, no telemetry (no network here)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
