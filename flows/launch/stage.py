"""`launch_stage`: run one stage on its target (in-process, torchrun, deepspeed, slurm, kubernetes), return its outputs."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.launch.cluster import cluster_slot
from flows.launch.commands import deepspeed_command, entry_args, torchrun_command
from flows.launch.kubernetes import run_kubernetes
from flows.launch.slurm import scancel, slurm_script
from flows.launch.spec import RESULT_FILE, LaunchError, LaunchSpec, dump_recipe, recipe_obj
from flows.launch.supervise import read_result, stream, torchrun_failure, traceback_tail
from stages.registry import runnable


def default_log() -> Callable[[str], None]:
    """The Prefect run logger inside a flow or task, print otherwise."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger().info
    except MissingContextError:
        return lambda line: print(line, flush=True)


def launch_stage(stage: str, recipe: Any, overrides: dict | None = None, parent_run_id: str | None = None,
                 spec: LaunchSpec | None = None, log: Callable[[str], None] | None = None,
                 cluster: Any = None, inputs: dict | None = None) -> dict:
    """Run `stage` on `spec.target` and return its outputs dict (what rank 0 wrote).

    inputs: the stage's input URIs by name ({"model": "runs:/<id>/model"}); missing ones resolve in MLflow.
    recipe: a preset name, a YAML path, or a validated Recipe (written to the workdir as YAML for subprocesses).
    cluster: the recipe's ClusterConfig for the slurm script (default: the recipe's own).
    """
    spec = spec or LaunchSpec()
    log = log or default_log()
    cfg = recipe_obj(recipe, overrides)
    with cluster_slot(cfg.cluster, f"stage {stage}", log):  # one stage at a time on the cluster's nodes
        return _launch(stage, recipe, overrides, parent_run_id, spec, log, cluster, inputs, cfg)


def _launch(stage, recipe, overrides, parent_run_id, spec: LaunchSpec, log, cluster, inputs, cfg) -> dict:
    if spec.target == "local":
        return run_local(stage, recipe, overrides, parent_run_id, inputs)
    if spec.target == "kubernetes":
        return run_kubernetes(stage, recipe, overrides, parent_run_id, inputs, spec, log)

    workdir = Path(spec.workdir) if spec.workdir else \
        Path(cfg.output_dir) / "launch" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = spec.model_copy(update={"workdir": str(workdir)})
    if isinstance(recipe, (str, Path)):  # a preset name, or a file: absolute, for ranks started elsewhere
        recipe_arg, overrides_arg = (Path(recipe).resolve() if Path(recipe).is_file() else recipe), overrides
    else:  # a Recipe object (overrides already applied): the ranks load the same values from a file
        recipe_arg, overrides_arg = dump_recipe(cfg, workdir / "recipe.yaml"), None
    result_file = workdir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    args = entry_args(stage, str(recipe_arg), overrides_arg, parent_run_id, result_file, inputs)

    if spec.target == "torchrun":
        log_dir = workdir / "torchrun-logs"
        shutil.rmtree(log_dir, ignore_errors=True)
        code, tail = stream(torchrun_command(spec, args, log_dir), spec, log)
        if code != 0:
            raise LaunchError(torchrun_failure(stage, code, tail, log_dir))
    elif spec.target == "deepspeed":
        code, tail = stream(deepspeed_command(spec, args), spec, log)
        if code != 0:
            raise LaunchError(f"stage {stage} failed under deepspeed (exit {code}):\n{traceback_tail(tail)}")
    elif spec.target == "slurm":
        script = workdir / "job.sbatch"
        script.write_text(slurm_script(spec, cluster or cfg.cluster, args))
        shutil.rmtree(workdir / "torchrun-logs", ignore_errors=True)
        code, tail = stream(["sbatch", "--wait", "--parsable", str(script)], spec, log,
                            follow=workdir, follow_glob="slurm-*.out", on_abort=scancel)
        if code != 0:
            raise LaunchError(torchrun_failure(stage, code, tail, workdir / "torchrun-logs", "slurm"))
    else:  # pragma: no cover - the Literal covers every target
        raise LaunchError(f"unknown target {spec.target}")
    return read_result(stage, result_file)


def run_local(stage, recipe, overrides, parent_run_id, inputs=None) -> dict:
    """In this process, no subprocess: the registry's stage function on the validated recipe, reporting progress (bars
    on a terminal, step lines in the log otherwise)."""
    fns = runnable()
    if stage not in fns:
        raise LaunchError(f"stage {stage!r} is not runnable; runnable stages: {list(fns)}")
    return fns[stage](recipe_obj(recipe, overrides), inputs=inputs, parent_run_id=parent_run_id, progress=True)
