"""The flow a Kubernetes pod runs (`r1-stage`): one stage, launched inside the pod the way `launch_stage` launches it
locally. Deployed from this file (`prefect deploy flows/launch/pod.py:r1_stage`, docs/scaling.md)."""

from __future__ import annotations

from prefect import flow

from flows.launch.spec import LaunchSpec
from flows.launch.stage import launch_stage


@flow(name="r1-stage", persist_result=True, log_prints=True)
def r1_stage(stage: str, recipe: str | dict = "tiny", overrides: dict | None = None, parent_run_id: str | None = None,
             launch: LaunchSpec | None = None, inputs: dict[str, str] | None = None) -> dict:
    """One stage where this flow runs (a Kubernetes pod): in-process, or torchrun over the pod's GPUs.

    inputs: the input URIs the pipeline planned ({"model": "runs:/<id>/model"}); missing ones resolve in MLflow."""
    return launch_stage(stage, recipe, overrides, parent_run_id, launch or LaunchSpec(), inputs=inputs or None)
