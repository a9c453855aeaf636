"""`r1 serve`: the pipeline and every stage as deployments on a running Prefect server, with the recipe's schedules.

Deployments are named after the recipe (`r1-pipeline/tiny`, `r1-reasoning-rl/tiny`); their default parameters carry the
recipe and its overrides, so the UI's "Run" button reruns exactly what was served, and "Custom run" edits the form.
The serving process runs the flow runs itself (Prefect's `serve`), in subprocesses started from the current folder.
It also sets up what long runs need (`prepare_server`): heartbeats, an automation that marks a flow run whose process
died Crashed, one that reschedules the served recipe's crashed runs (at most `cluster.crash_retries` times; they resume
from the stages' checkpoints), and the served cluster's concurrency limit (docs/scaling.md, "Cluster concurrency").
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import anyio
from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.schedules import Cron

from flows.launch.cluster import ensure_limit
from flows.pipeline import r1_pipeline
from flows.stage_flows import STAGE_FLOWS
from stages.core.recipe import PRESET_DIR, Recipe, load_recipe

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 180  # flow runs report this often: Prefect's default, which runs started elsewhere keep too
MISSED_HEARTBEATS = 3  # a run silent this many heartbeats long is marked Crashed (the automation sees every run)
CRASH_AUTOMATION = "r1: mark flow runs without heartbeats Crashed"
RETRY_AUTOMATION = "r1: retry crashed runs of recipe {}"
PAUSE_TIMEOUT = 5.0  # seconds to pause the schedules on Ctrl-C; the server may already be gone (`r1 up` stopped first)


class ServeError(RuntimeError):
    """No Prefect server to register deployments with, or a schedule that Prefect refuses."""


def recipe_reference(recipe: str) -> str:
    """The recipe as the served process will find it: a preset name stays a name, a file becomes an absolute path."""
    if not Path(recipe).exists() and (PRESET_DIR / f"{recipe}.yaml").exists():
        return recipe
    return str(Path(recipe).resolve())


def schedules_for(cfg: Recipe, flow: str, recipe_ref: str, overrides: dict[str, Any]) -> list:
    """Prefect schedules for `flow` ("pipeline" or a stage name). Each carries complete run parameters: the served
    recipe with the schedule's own overrides on top, and `force` (for the pipeline: every stage)."""
    out = []
    for s in cfg.schedules:
        if s.flow != flow:
            continue
        merged = {**overrides, **s.overrides}
        if flow == "pipeline":
            params = {"recipe": recipe_ref, "overrides": merged, "force": list(STAGE_FLOWS) if s.force else None}
        else:
            params = {"request": {"recipe": recipe_ref, "overrides": merged, "force": s.force}}
        out.append(Cron(s.cron, timezone=s.timezone, active=s.active, parameters=params))
    return out


def build_deployments(cfg: Recipe, recipe: str, overrides: dict[str, Any] | None = None) -> list:
    """RunnerDeployments for the pipeline and each stage, named after the recipe, with its schedules."""
    ref = recipe_reference(recipe)
    overrides = overrides or {}
    tags = ["r1", f"recipe:{cfg.name}"]
    deployments = [r1_pipeline.to_deployment(
        name=cfg.name, parameters={"recipe": ref, "overrides": overrides}, schedules=schedules_for(cfg, "pipeline", ref, overrides),
        tags=tags, description=f"the whole R1 chain on recipe {cfg.name}")]
    for stage, fl in STAGE_FLOWS.items():
        deployments.append(fl.to_deployment(
            name=cfg.name, parameters={"request": {"recipe": ref, "overrides": overrides, "force": False}},
            schedules=schedules_for(cfg, stage, ref, overrides), tags=[*tags, f"stage:{stage}"],
            description=f"rerun stage {stage} of recipe {cfg.name}"))
    return deployments


def check_server() -> str:
    """The configured Prefect API URL, after checking it answers; a clear error when there is none."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()  # the environment variable, a Prefect profile or a settings context
    if not url:
        raise ServeError("r1 serve registers deployments with a running Prefect server, and PREFECT_API_URL is not "
                         "set. Start one with `r1 up`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`.")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise ServeError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({e}); start it with "
                         "`r1 up` or fix PREFECT_API_URL") from None
    return url


class ServeRunner(Runner):
    """Prefect's runner, whose shutdown does not hang on a server that is gone: pausing the deployments' schedules
    (Prefect retries each request for a long while) gets PAUSE_TIMEOUT seconds in all, then one warning. Prefect's
    own lines as it stops stay off the console: `serve_until_stopped` says how it ended in one."""

    schedules: str = "untouched"  # on stopping: paused, or left active (a warning said so)

    async def _pause_schedules(self):  # the first thing Prefect's runner does when it stops
        # its lines as it stops stay off the console: pausing, its observer's websocket to a server that is gone, and
        # asyncio's error about that observer's cancelled polling task (Prefect calls .exception() on it)
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda record: not record.name.startswith(("prefect", "asyncio")))
        try:
            with anyio.fail_after(PAUSE_TIMEOUT):
                await super()._pause_schedules()
            self.schedules = "paused"
        except (Exception, asyncio.CancelledError) as e:  # any failure here only means the schedules stay as they are
            self.schedules = "left active"
            log.warning("r1 serve stopped; schedules left active: the Prefect server did not answer within %.0f s "
                        "(%s); pause them in the UI if they should not run", PAUSE_TIMEOUT, type(e).__name__)
            if isinstance(e, asyncio.CancelledError):
                raise


def crash_automation(within_seconds: float):
    """Prefect's zombie-flow automation: a flow run whose heartbeat is not followed by another heartbeat or a final
    state within `within_seconds` (its process was SIGKILLed, OOM-killed, or its node lost) is set Crashed, instead of
    showing Running forever."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=CRASH_AUTOMATION, description="set up by `r1 serve` (flows/deployments.py)",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *final},
                             match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=within_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_seconds:g} s: the flow run's process is gone")])


def ensure_crash_automation(within_seconds: float = MISSED_HEARTBEATS * HEARTBEAT_SECONDS) -> None:
    """Create the crash automation on the Prefect server unless one of that name exists (edit it in the UI)."""
    from prefect.automations import Automation

    try:
        Automation.read(name=CRASH_AUTOMATION)
    except ValueError:  # none of that name
        crash_automation(within_seconds).create()
        log.info("created automation %r (%g s without heartbeat)", CRASH_AUTOMATION, within_seconds)


def retry_automation(recipe_name: str, retries: int):
    """Reschedule a crashed flow run of the recipe's deployments (its process died: marked Crashed by the runner that
    started it, or by the crash automation when the runner went too) with its own parameters, so a runner of the
    deployment runs it again and its stages resume from their checkpoints; at most `retries` times. The cap is the
    attempt count Prefect puts on each flow-run event (`prefect.run-count`, 1 on the first attempt, +1 per rerun): the
    trigger matches attempts 1..retries only, so the crash of attempt retries+1 stays Crashed. Flow runs of other
    recipes (another `recipe:` tag) and runs not from a deployment (nothing would pick them up) are left alone."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=RETRY_AUTOMATION.format(recipe_name), description="set up by `r1 serve` (flows/deployments.py)",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"},
                             match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"],
                                                          "prefect.run-count": [str(i) for i in range(1, retries + 1)]}),
                             match_related=[ResourceSpecification({"prefect.resource.role": "tag",
                                                                   "prefect.resource.id": f"prefect.tag.recipe:{recipe_name}"}),
                                            ResourceSpecification({"prefect.resource.role": "deployment"})],
                             for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry",
                                    message=f"rescheduled after a crash (at most {retries} times, cluster.crash_retries)")])


def ensure_retry_automation(recipe_name: str, retries: int) -> None:
    """The recipe's retry automation as the recipe says now: replaced when it exists, none when retries is 0."""
    from prefect.client.orchestration import get_client

    name = RETRY_AUTOMATION.format(recipe_name)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name):
            client.delete_automation(old.id)
    if retries:
        retry_automation(recipe_name, retries).create()
        log.info("created automation %r (at most %d reruns of a crashed flow run)", name, retries)


def prepare_server(deployments: list) -> None:
    """What `r1 serve` sets up besides the deployments: heartbeats of its flow runs (inherited by the processes it
    starts), the automation that marks silent ones Crashed, the one that retries the served recipe's crashed runs, and
    its cluster concurrency limit."""
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    ensure_crash_automation()
    served = next((d.parameters for d in deployments if d.flow_name == r1_pipeline.name), None)
    if served:
        cfg = load_recipe(served["recipe"], served.get("overrides"))
        ensure_retry_automation(cfg.name, cfg.cluster.crash_retries)
        ensure_limit(cfg.cluster)


def serve_until_stopped(deployments: list, limit: int | None = None, on_ready=None) -> None:
    """Register the deployments, call `on_ready()` (they can be run from then on), and run their flow runs until
    Ctrl-C (or SIGTERM); then stop cleanly, with or without a server."""
    prepare_server(deployments)
    runner = ServeRunner(limit=limit)
    for d in deployments:
        runner.add_deployment(d)  # registers it with the server before returning
    if on_ready is not None:
        on_ready()
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass
    if runner.schedules == "paused":
        log.info("r1 serve stopped; the deployments' schedules are paused")
    elif runner.schedules == "untouched":  # stopped before the runner started
        log.info("r1 serve stopped")
