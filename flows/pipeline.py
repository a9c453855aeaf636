"""The pipeline flow: the R1 stages chained as Prefect tasks, one MLflow parent run per pipeline run.

Stages hand work on as URIs (runs:/<id>/model). Stages not yet built are refused by name before anything starts.
Ctrl-C or SIGTERM stops the chain: the stage's MLflow run and the pipeline's are marked KILLED, the task and flow runs
Cancelled (Prefect would say Crashed), the checkpoints stay, and a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled, State

from flows.launch import LaunchSpec, launch_stage
from stages.core import console, errors, tracking
from stages.core.attempts import killed_on_interrupt
from stages.core.context import evaluate_finished
from stages.core.lineage import (
    KEY_TAG,
    OUTPUTS_TAG,
    current_evaluation,
    finished_run_with_key,
    resolve_input,
    stage_key,
)
from stages.core.order import check_stages, inputs_of, pipeline_inputs
from stages.core.preflight import preflight
from stages.core.recipe import Recipe, load_recipe
from stages.registry import runnable

log = logging.getLogger(__name__)


def recipe_label(recipe: str) -> str:
    """A recipe as a run name shows it: the preset name, or a YAML file's name without its folder and suffix."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def pipeline_run_name() -> str:
    """`tiny · pipeline · 2026-11-30 10:15`: the Prefect flow run's name (Prefect's default is two random words)."""
    recipe = current_flow_run.parameters.get("recipe", "tiny")
    return f"{recipe_label(recipe)} · pipeline · {time.strftime('%Y-%m-%d %H:%M')}"


@task(name="stage", retries=1, retry_delay_seconds=5, task_run_name="{recipe.name} · {name}")
def run_stage(name: str, recipe: Recipe, parent_run_id: str, inputs: dict[str, str]) -> dict[str, str]:
    """One stage, launched the way the recipe's `cluster` says (in-process, torchrun, DeepSpeed, Slurm, Kubernetes).
    A retry reruns the same stage key, so it resumes from the checkpoints the failed attempt left."""
    log.debug("stage %s inputs: %s", name, inputs)
    try:
        return launch_stage(name, recipe, None, parent_run_id, LaunchSpec.from_cluster(recipe.cluster),
                            log=logging.getLogger(f"flows.launch.{name}").info, inputs=inputs)
    except BaseException as e:
        if not errors.is_interrupt(e):
            raise
        return cancelled(e, f"stage {name}")


def cancelled(e: BaseException, what: str) -> State:
    """The Prefect state of a run stopped by Ctrl-C or SIGTERM: Cancelled, not Crashed (no retry either), carrying the
    one line the user sees. Prefect's own lines about it stay off the console from here on: that line says it all."""
    errors.handled()
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not record.name.startswith("prefect"))
    message = str(e) if str(e).startswith("interrupted:") else f"interrupted: {what} stopped"
    return Cancelled(message=message)


def cancel_on_interrupt(chain):
    """Run `chain()` in a flow; Ctrl-C or SIGTERM ends the flow run Cancelled (a direct call then raises CancelledRun
    with the message). SIGTERM is ours again inside the flow run (Prefect's handler would crash the run)."""
    before = errors.raise_on_signals()
    try:
        return chain()
    except BaseException as e:
        if not errors.is_interrupt(e):
            raise
        return cancelled(e, "the pipeline")
    finally:
        errors.restore_signals(before)


def plan_inputs(cfg: Recipe, chain: list[str], given: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Inputs of every stage whose upstream is not in `chain`: a `given` URI or run id, else the newest finished upstream
    run in MLflow, resolved now, so a sub-chain with a missing upstream fails before any stage starts."""
    planned = {}
    for name in chain:
        planned[name] = {key: resolve_input(cfg, given, key, up, art)
                         for key, (up, art) in inputs_of(cfg, name).items() if up not in chain}
    return planned


@task(name="evaluate", task_run_name="{name}-evaluation")
def evaluate_stage(name: str, recipe: Recipe, parent_run_id: str, outputs: dict[str, str], key: str) -> str:
    """Re-evaluate a reused stage's model under new eval settings (in this process); returns the evaluation run's id."""
    log.info("stage %s: evaluation settings changed, evaluating the model of run %s", name, outputs["run_id"])
    return evaluate_finished(recipe, name, outputs, key, parent_run_id)


def reusable_run(cfg: Recipe, name: str, inputs: dict[str, str]):
    """A finished run of this stage with the same stage key (config, inputs, code, data content), or None."""
    return finished_run_with_key(cfg, stage_key(name, getattr(cfg, name), inputs, cfg))


def run_chain(recipe: str, stages: list[str] | None, overrides: dict | None, force: list[str] | None,
              inputs: dict[str, str] | None, run_name: str) -> dict:
    """What the pipeline flow and every single-stage flow do: validate, resolve inputs, open the parent MLflow run,
    then reuse or run each stage in order, and publish a summary (also when a stage fails)."""
    console.setup()  # again: importing Prefect configured its own loggers; the mode is the launching process's
    cfg = load_recipe(recipe, overrides)
    chain = check_stages(stages or list(runnable()))
    forced = set(check_stages(force or []))
    preflight(cfg, chain, inputs)  # everything that can refuse the run before a model loads (names, files, data, ...)
    import mlflow

    planned = plan_inputs(cfg, chain, inputs)
    exp_id = tracking.setup(cfg.tracking)
    outputs: dict[str, dict] = {}
    skipped: list[str] = []
    evaluated: dict[str, str] = {}  # reused stage -> the run holding its evaluation under these eval settings
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{run_name}-{cfg.name}",
                          tags={tracking.RECIPE_TAG: cfg.name, tracking.STAGE_TAG: "pipeline"}) as parent, \
            killed_on_interrupt(parent.info.run_id, f"{run_name} {cfg.name}"):
        try:
            for name in chain:
                stage_inputs = {**planned[name], **pipeline_inputs(cfg, name, outputs)}
                run = None if name in forced else reusable_run(cfg, name, stage_inputs)
                if run is None:
                    out = run_stage(name, cfg, parent.info.run_id, stage_inputs)
                    if isinstance(out, State):  # the task run was cancelled: an interrupt
                        raise errors.Interrupted(out.message)
                    outputs[name] = out
                    continue
                console.stage_reused(name, run.info.run_id, run.data.metrics,
                                     console.run_url(console.ui_address(cfg.tracking), exp_id, run.info.run_id))
                outputs[name] = json.loads(run.data.tags[OUTPUTS_TAG])
                skipped.append(name)
                evaluation = current_evaluation(cfg, run) or evaluate_stage(name, cfg, parent.info.run_id,
                                                                            outputs[name], run.data.tags[KEY_TAG])
                if evaluation != run.info.run_id:
                    evaluated[name] = evaluation
        except BaseException:  # a failed chain still gets its summary: what ran, what was reused, where it stopped
            try:
                publish_summary(cfg, parent.info.run_id, chain, outputs, skipped, evaluated)
            except Exception as e:  # noqa: BLE001 -- the stage's own error is the one to report
                log.warning("the pipeline summary could not be published: %s", e)
            raise
        mlflow.set_tag("r1.skipped", ",".join(skipped))
    publish_summary(cfg, parent.info.run_id, chain, outputs, skipped, evaluated)
    return {"pipeline_run_id": parent.info.run_id, "stages": outputs, "skipped": skipped, "evaluated": evaluated}


@flow(name="r1-pipeline", flow_run_name=pipeline_run_name, persist_result=True)
def r1_pipeline(recipe: str = "tiny", stages: list[str] | None = None, overrides: dict[str, Any] | None = None,
                force: list[str] | None = None, inputs: dict[str, str] | None = None) -> dict:
    """Run the R1 chain (or a sub-chain) from a recipe preset name or YAML path.

    A stage whose config and inputs equal those of a finished run is skipped and that run's outputs are reused;
    `force` names stages to rerun anyway. A changed stage gets new outputs, so everything downstream reruns too.
    `inputs` (key -> URI or run id) feeds a sub-chain's first stage instead of the newest finished upstream run.
    """
    return cancel_on_interrupt(lambda: run_chain(recipe, stages, overrides, force, inputs, run_name="pipeline"))


SUMMARY_METRICS = ("eval/pass_at_1", "eval/greedy_accuracy", "eval/format_rate", "eval/language_consistency")


def stage_status(name: str, chain: list[str], outputs: dict[str, dict], skipped: list[str]) -> str:
    """ran, reused, failed (the first stage of the chain without outputs) or not run (those after it)."""
    if name in outputs:
        return "reused" if name in skipped else "ran"
    first_missing = next(n for n in chain if n not in outputs)
    return "failed" if name == first_missing else "not run"


def summary_markdown(cfg: Recipe, pipeline_run_id: str, chain: list[str], outputs: dict[str, dict],
                     skipped: list[str], evaluated: dict[str, str] | None = None) -> str:
    """Markdown: one row per stage of the chain with its status, held-out evaluation (from the evaluation run of a
    reused stage whose eval settings changed) and MLflow run (a link when an MLflow UI is known)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    ui = console.ui_address(cfg.tracking)

    def link(run_id: str) -> str:
        return f"[{run_id[:8]}]({console.run_url(ui, exp.experiment_id, run_id)})" if ui else f"`{run_id[:8]}`"

    head = "| stage | status | " + " | ".join(m.split("/")[1] for m in SUMMARY_METRICS) + " | MLflow run |"
    lines = [f"# R1 pipeline `{cfg.name}`", "",
             f"Pipeline run {link(pipeline_run_id)} in experiment `{cfg.tracking.experiment}` at `{cfg.tracking.uri}`"
             + ("" if cfg.tracking.uri.startswith("http") else
                f" (browse: `r1 up`, or `mlflow ui --backend-store-uri {cfg.tracking.uri}`)"), "",
             head, "|" + " --- |" * (3 + len(SUMMARY_METRICS))]
    evaluated = evaluated or {}
    for name in chain:
        out = outputs.get(name)
        metrics = mlflow.get_run(evaluated.get(name, out["run_id"])).data.metrics if out else {}
        values = " | ".join(f"{metrics[m]:.3f}" if m in metrics else "–" for m in SUMMARY_METRICS)
        status = stage_status(name, chain, outputs, skipped)
        if name in evaluated:
            status += f", evaluated in {link(evaluated[name])}"
        run = link(out["run_id"]) if out else "–"
        lines.append(f"| {name} | {status} | {values} | {run} |")
    return "\n".join(lines)


def publish_summary(cfg: Recipe, pipeline_run_id: str, chain: list[str], outputs: dict[str, dict],
                    skipped: list[str], evaluated: dict[str, str] | None = None) -> None:
    """The summary as a Prefect artifact of the flow run (Artifacts tab in the Prefect UI) and an MLflow text file."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    md = summary_markdown(cfg, pipeline_run_id, chain, outputs, skipped, evaluated)
    create_markdown_artifact(markdown=md, key=f"r1-{cfg.name}-summary".replace("_", "-").lower(),
                             description="stages, MLflow runs and held-out evaluation of this pipeline run")
    mlflow.MlflowClient().log_text(pipeline_run_id, md, "summary.md")


SERVER_STARTUP_S = 180  # Prefect's own wait (20 s) timed out on a loaded laptop (a model loading, a test suite)


def configure_local_prefect() -> None:
    """Serverless local Prefect: a temporary server per run, no telemetry (no network here).

    The temporary server is started here, with SIGINT blocked (a blocked signal stays blocked across exec): Ctrl-C in
    a terminal reaches the whole process group, and a server that died with it would leave the interrupted flow run
    RUNNING, its last API calls failing with connection errors. Prefect stops it at exit (SIGTERM)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(SERVER_STARTUP_S))
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start(timeout=SERVER_STARTUP_S)  # the instance Prefect's client uses without an API URL
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
