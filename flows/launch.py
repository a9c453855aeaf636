"""Launch one stage's entry point on the target the recipe's `cluster` names, and hand back its outputs.

A Prefect stage task calls `launch_stage(...)`; what runs is always `python -m stages.entry NAME --recipe R --overrides
JSON --parent-run-id ID --result-file F`, and rank 0 writes the stage outputs (run id, artifact URIs) to F:

  local       in this process: `stages.registry.runnable()[NAME](recipe, ...)`, no subprocess
  torchrun    `torchrun --nproc-per-node N -m stages.entry ...` on this node, output streamed line by line
  deepspeed   `deepspeed --hostfile H --num_nodes N --num_gpus G --module stages.entry ...` (hostfile = nodes over ssh)
  slurm       an sbatch script (`srun torchrun` with a c10d rendezvous on the first node), `sbatch --wait`
  kubernetes  a run of the `r1-stage` flow deployment on a Prefect Kubernetes work pool (infra/prefect/), one pod

Multi-node targets need `workdir` on storage every node sees (rank 0 writes the result file there). See docs/scaling.md.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages import registry
from stages.core.recipe import Recipe, load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA_DIR = REPO_ROOT / "infra"
K8S_TEMPLATE = INFRA_DIR / "prefect" / "k8s-base-job-template.json"
RESULT_FILE = "result.json"
Target = Literal["local", "torchrun", "deepspeed", "slurm", "kubernetes"]


class LaunchError(RuntimeError):
    """A launched stage failed; the message holds the failing rank's error (traceback tail)."""


class LaunchSpec(BaseModel):
    """How to run one stage. `from_cluster` builds it from a recipe's `cluster` section."""

    model_config = ConfigDict(extra="forbid")

    target: Target = "local"
    nproc_per_node: int = Field(1, ge=1, description="processes per node (= GPUs per node on GPU machines)")
    nodes: int = Field(1, ge=1)
    hostfile: str | None = Field(None, description="deepspeed: MPI-style hostfile (`worker-0 slots=8`), one line a node")
    master_addr: str | None = Field(None, description="deepspeed: address of the rank-0 node (default: first host)")
    master_port: int | None = Field(None, ge=1, le=65535,
                                    description="rendezvous port; None: torchrun --standalone picks a free one, "
                                                "deepspeed and slurm use 29500")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the launched processes")
    module: str = Field("stages.entry", description="module run with -m (tests launch their own)")
    timeout: float | None = Field(None, gt=0, description="seconds before the launch is killed; None = no limit")
    workdir: str | None = Field(None, description="result file, logs, scripts; default <recipe.output_dir>/launch/...")
    # slurm
    job_name: str | None = Field(None, description="slurm job / k8s job name (default r1-<stage>)")
    time_limit: str = Field("24:00:00", description="slurm --time")
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = Field(None, ge=1)
    setup: list[str] | None = Field(None, description="slurm: shell lines run before srun (default: this venv on PATH)")
    # kubernetes
    deployment: str = Field("r1-stage/r1-stage-k8s", description="flow/deployment name on the Kubernetes work pool")
    image: str | None = None
    cpu: str | None = None
    memory: str | None = None
    namespace: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.nodes > 1 and self.target in ("local", "torchrun", "kubernetes"):
            raise ValueError(f"nodes={self.nodes} needs target deepspeed or slurm (got {self.target})")
        if self.target == "deepspeed" and self.nodes > 1 and not self.hostfile:
            raise ValueError("deepspeed on several nodes needs a hostfile")
        return self

    @classmethod
    def from_cluster(cls, cluster: Any, **kw) -> LaunchSpec:
        """From a recipe's ClusterConfig: launcher -> target, nodes, nproc_per_node (default gpus_per_node; CPU: 1).

        Any other LaunchSpec field the cluster section has (hostfile, master_port, env, partition, image, ...) is taken
        too, so new recipe fields need no change here; `kw` wins over both.
        """
        nproc = getattr(cluster, "nproc_per_node", None) or max(cluster.gpus_per_node, 1)
        base: dict[str, Any] = {"target": cluster.launcher, "nodes": cluster.nodes, "nproc_per_node": nproc}
        for name in cls.model_fields:
            value = getattr(cluster, name, None)
            if name not in base and value is not None:
                base[name] = value
        return cls(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------------
# the entry point's arguments and the launch commands


def entry_args(stage: str, recipe: str, overrides: dict | None, parent_run_id: str | None,
               result_file: str | Path, inputs: dict | None = None) -> list[str]:
    """The arguments of `python -m stages.entry` (after the module name)."""
    args = [stage, "--recipe", str(recipe), "--overrides", json.dumps(overrides or {})]
    if inputs:
        args += ["--inputs", json.dumps(inputs)]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    return args + ["--result-file", str(result_file)]


def torchrun_command(spec: LaunchSpec, args: list[str], log_dir: str | Path | None = None) -> list[str]:
    """`torchrun` (as `python -m torch.distributed.run`, so this interpreter's torch) for one node.

    With `log_dir`, every rank's stdout/stderr is teed to `<log_dir>/<run>/attempt_<k>/<local_rank>/std{out,err}.log`
    and TORCHELASTIC_ERROR_FILE points there, which is how a failing rank's traceback is found.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(spec.nproc_per_node)]
    if spec.master_port is None:
        cmd += ["--standalone"]  # a c10d store on a free port: parallel launches on one machine do not collide
    else:
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(spec.master_port)]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir), "--tee", "3"]
    return cmd + ["-m", spec.module, *args]


def deepspeed_command(spec: LaunchSpec, args: list[str]) -> list[str]:
    """The DeepSpeed launcher: over the hostfile's nodes (ssh/pdsh) or on this node when there is no hostfile.

    `--no_local_rank`: the entry point reads LOCAL_RANK from the environment, it takes no `--local_rank` argument.
    """
    venv_exe = Path(sys.executable).parent / "deepspeed"
    exe = str(venv_exe) if venv_exe.exists() else (shutil.which("deepspeed") or "deepspeed")
    cmd = [exe]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile, "--num_nodes", str(spec.nodes)]
    if spec.master_addr:
        cmd += ["--master_addr", spec.master_addr]
    cmd += ["--num_gpus", str(spec.nproc_per_node), "--master_port", str(spec.master_port or 29500), "--no_local_rank",
            "--module", spec.module]
    return cmd + list(args)


def slurm_script(spec: LaunchSpec, recipe_cluster: Any, args: list[str]) -> str:
    """An sbatch script: one task per node, each running torchrun with a c10d rendezvous on the job's first node."""
    nodes, gpus = recipe_cluster.nodes, recipe_cluster.gpus_per_node
    nproc = gpus if gpus > 0 else spec.nproc_per_node
    workdir = Path(spec.workdir) if spec.workdir else Path(".")
    name = spec.job_name or f"r1-{args[0] if args else 'stage'}"
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={name}",
             f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if gpus > 0:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if spec.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    lines += [f"#SBATCH --time={spec.time_limit}", f"#SBATCH --output={workdir / 'slurm-%j.out'}"]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    lines += ["", "set -euo pipefail"]
    setup = spec.setup if spec.setup is not None else [f'export PATH={q(str(Path(sys.executable).parent))}:"$PATH"']
    lines += setup
    lines += [f"cd {q(os.getcwd())}",
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              f"export MASTER_PORT={spec.master_port or 29500}",
              f'export PYTHONPATH={q(str(REPO_ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
              "export PYTHONUNBUFFERED=1"]
    lines += [f"export {k}={q(v)}" for k, v in spec.env.items()]
    # each node's torchrun tees its ranks' output into its own folder under torchrun-logs/ (found again on failure)
    torchrun = ["srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", '"$SLURM_NNODES"', "--nproc-per-node",
                str(nproc), "--rdzv-id", '"$SLURM_JOB_ID"', "--rdzv-backend", "c10d", "--rdzv-endpoint",
                '"$MASTER_ADDR:$MASTER_PORT"', "--log-dir", q(str(workdir / "torchrun-logs")), "--tee", "3",
                "-m", spec.module, *[q(a) for a in args]]
    lines += ["", " \\\n    ".join(torchrun), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes: the Prefect work-pool base job template


def load_k8s_template(path: str | Path = K8S_TEMPLATE) -> dict:
    return json.loads(Path(path).read_text())


def k8s_job_variables(spec: LaunchSpec) -> dict:
    """Job variables for a flow run on the Kubernetes work pool (override the template's defaults)."""
    out: dict[str, Any] = {"gpus": spec.nproc_per_node}
    for key in ("image", "cpu", "memory", "namespace"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    if spec.env:
        out["env"] = dict(spec.env)
    return out


def fill_k8s_template(values: dict | None = None, template: dict | None = None) -> dict:
    """The job configuration the worker would build: variable defaults, then `values`, put into the placeholders.

    Same merge as Prefect's BaseJobConfiguration.from_template_and_values, without block/variable references.
    """
    from prefect.utilities.templating import apply_values

    template = template or load_k8s_template()
    props = template["variables"].get("properties", {})
    variables = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    variables.update(values or {})
    return apply_values(template=json.loads(json.dumps(template["job_configuration"])), values=variables)


# ---------------------------------------------------------------------------------------------------------------------
# running


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
    if spec.target == "local":
        return _run_local(stage, recipe, overrides, parent_run_id, inputs)
    if spec.target == "kubernetes":
        return _run_kubernetes(stage, recipe, overrides, parent_run_id, spec, log)

    cfg = _recipe_obj(recipe, overrides)
    workdir = Path(spec.workdir) if spec.workdir else \
        Path(cfg.output_dir) / "launch" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = spec.model_copy(update={"workdir": str(workdir)})
    if isinstance(recipe, (str, Path)):  # a preset name, or a file: absolute, for ranks started elsewhere
        recipe_arg, overrides_arg = (Path(recipe).resolve() if Path(recipe).is_file() else recipe), overrides
    else:  # a Recipe object (overrides already applied): the ranks load the same values from a file
        recipe_arg, overrides_arg = _dump_recipe(cfg, workdir / "recipe.yaml"), None
    result_file = workdir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    args = entry_args(stage, str(recipe_arg), overrides_arg, parent_run_id, result_file, inputs)

    if spec.target == "torchrun":
        log_dir = workdir / "torchrun-logs"
        shutil.rmtree(log_dir, ignore_errors=True)
        code, tail = _stream(torchrun_command(spec, args, log_dir), spec, log)
        if code != 0:
            raise LaunchError(_torchrun_failure(stage, code, tail, log_dir))
    elif spec.target == "deepspeed":
        code, tail = _stream(deepspeed_command(spec, args), spec, log)
        if code != 0:
            raise LaunchError(f"stage {stage} failed under deepspeed (exit {code}):\n{_traceback_tail(tail)}")
    elif spec.target == "slurm":
        script = workdir / "job.sbatch"
        script.write_text(slurm_script(spec, cluster or cfg.cluster, args))
        shutil.rmtree(workdir / "torchrun-logs", ignore_errors=True)
        code, tail = _stream(["sbatch", "--wait", "--parsable", str(script)], spec, log,
                             follow=workdir, follow_glob="slurm-*.out", on_abort=_scancel)
        if code != 0:
            raise LaunchError(_torchrun_failure(stage, code, tail, workdir / "torchrun-logs", "slurm"))
    else:  # pragma: no cover - the Literal covers every target
        raise LaunchError(f"unknown target {spec.target}")

    if not result_file.exists():
        raise LaunchError(f"stage {stage} finished but rank 0 wrote no result file ({result_file})")
    return json.loads(result_file.read_text())


def _recipe_obj(recipe: Any, overrides: dict | None):
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    if isinstance(recipe, dict):
        recipe = Recipe.model_validate(recipe)
    if overrides:
        data = recipe.model_dump(mode="json")
        for key, value in overrides.items():
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        recipe = Recipe.model_validate(data)
    return recipe


def _dump_recipe(cfg, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _run_local(stage, recipe, overrides, parent_run_id, inputs=None) -> dict:
    fns = registry.runnable()
    if stage not in fns:
        raise LaunchError(f"stage {stage!r} is not runnable; runnable stages: {list(fns)}")
    return fns[stage](_recipe_obj(recipe, overrides), inputs=inputs, parent_run_id=parent_run_id, progress=False)


def _child_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)
    return env


def _stream(cmd: list[str], spec: LaunchSpec, log: Callable[[str], None], follow: Path | None = None,
            follow_glob: str = "", on_abort: Callable[[list[str]], None] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, passing each output line to `log` as it comes; returns (exit code, last lines).

    follow: also tail files matching `follow_glob` there (the Slurm job's output file) while waiting.
    on_abort: called with the output so far when the launch is killed (timeout, interrupt), e.g. to scancel a job.
    """
    tail: collections.deque[str] = collections.deque(maxlen=400)
    log(f"$ {shlex.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace", env=_child_env(spec), start_new_session=True)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    offsets: dict[Path, int] = {}
    try:
        while proc.poll() is None:
            if follow is not None:
                _follow_files(follow, follow_glob, offsets, tail, log)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"launch timed out after {spec.timeout:g} s: {shlex.join(cmd)}\n"
                                  + "\n".join(list(tail)[-20:]))
            time.sleep(0.2 if follow is None else 2.0)
    except BaseException:  # timeout, Ctrl-C, a cancelled Prefect task: the ranks must not outlive the launch
        _kill(proc)
        if on_abort is not None:
            on_abort(list(tail))
        reader.join(timeout=5)
        raise
    reader.join(timeout=10)
    if follow is not None:
        _follow_files(follow, follow_glob, offsets, tail, log)
    return proc.returncode, list(tail)


def _scancel(output: list[str]) -> None:
    """Cancel the Slurm job whose id `sbatch --parsable` printed first (killing `sbatch --wait` leaves it running)."""
    job = next((ln.split(";")[0].strip() for ln in output if ln.split(";")[0].strip().isdigit()), None)
    if job:
        try:
            subprocess.run(["scancel", job], check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass


def _follow_files(folder: Path, pattern: str, offsets: dict, tail, log) -> None:
    for f in sorted(folder.glob(pattern)):
        with f.open("r", errors="replace") as fh:
            fh.seek(offsets.get(f, 0))
            chunk = fh.read()
            offsets[f] = fh.tell()
        for line in chunk.splitlines():
            tail.append(line)
            log(line)


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (torchrun forwards it to the ranks), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]: ?")
_ROOT_CAUSE = re.compile(r"Root Cause.*?local_rank:\s*(\d+)\)", re.DOTALL)
_FAILURE = re.compile(r"local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
# errors a rank gets because another one died: never the cause when a rank with another error exists
_SECONDARY = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer", "SIGTERM")


def _traceback_tail(lines: list[str], max_lines: int = 60) -> str:
    """The last traceback in `lines` (rank prefixes removed), or the last lines when there is none."""
    clean = [_RANK_PREFIX.sub("", ln) for ln in lines]
    starts = [i for i, ln in enumerate(clean) if "Traceback (most recent call last)" in ln]
    # torchrun's own ChildFailedError traceback comes last; prefer the one before it when there is one
    own = [i for i in starts if any("ChildFailedError" in ln for ln in clean[i:i + 40])]
    starts = [i for i in starts if i not in own] or starts
    if not starts:
        return "\n".join(clean[-30:])
    block = clean[starts[-1]:]
    # the exception line: the first one after the frames that is not indented
    end = next((j for j, ln in enumerate(block[1:], 1) if ln.strip() and not ln.startswith((" ", "\t"))), len(block) - 1)
    block = block[:end + 1]
    return "\n".join(block if len(block) <= max_lines else block[:3] + ["  ..."] + block[-(max_lines - 4):])


def _torchrun_failure(stage: str, code: int, output: list[str], log_dir: Path, under: str = "torchrun",
                      max_ranks: int = 3) -> str:
    """The failing ranks' errors (error.json, else the traceback in stderr.log), the one that caused it first.

    torchrun names a root cause, but when one rank's crash makes the others fail in a collective ("Connection closed
    by peer") within one monitoring interval, it can name a victim; such secondary errors are put last.
    """
    text = "\n".join(output)
    ranks = _rank_dirs(log_dir)
    first: list[int] = []
    if m := _ROOT_CAUSE.search(text):
        first.append(int(m.group(1)))
    first += [int(r) for r, rc in _FAILURE.findall(text) if rc not in ("-15", "-9")]  # not killed by torchrun
    order = [k for lr in dict.fromkeys(first) for k in ranks if k[1] == lr]
    order += [k for k, d in sorted(ranks.items()) if "Traceback" in _read(d / "stderr.log")]
    several_nodes = len({run for run, _ in ranks}) > 1
    errors = []
    for key in dict.fromkeys(order):
        d = ranks[key]
        err = _error_json(d / "error.json")
        if err is None and "Traceback" in _read(d / "stderr.log"):
            err = _traceback_tail(_read(d / "stderr.log").splitlines())
        label = f"local rank {key[1]} of {key[0]}" if several_nodes else f"rank {key[1]}"
        errors.append((label, err))
    errors.sort(key=lambda e: e[1] is None or any(w in e[1] for w in _SECONDARY))  # stable: root cause first
    parts = [f"stage {stage} failed under {under} (exit {code}); logs in {log_dir}"]
    parts += [f"{label} error:\n{err or '(no traceback in its log)'}" for label, err in errors[:max_ranks]]
    if not errors:
        parts.append(_traceback_tail(output))
    return "\n".join(parts)


def _rank_dirs(log_dir: Path) -> dict[tuple[str, int], Path]:
    """(torchrun run folder, local rank) -> the rank's log folder in that run's last attempt; one run per node."""
    out: dict[tuple[str, int], Path] = {}
    for run in sorted(p for p in log_dir.glob("*") if p.is_dir()):
        attempts = sorted(run.glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
        for r in attempts[-1].iterdir() if attempts else []:
            if r.is_dir() and r.name.isdigit():
                out[(run.name, int(r.name))] = r
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _error_json(path: Path) -> str | None:
    """The traceback torch.distributed.elastic's @record wrote for a rank (None when the rank wrote none)."""
    try:
        data = json.loads(path.read_text())
        msg = data["message"]
        if isinstance(msg, dict):
            stack = msg.get("extraInfo", {}).get("py_callstack")
            return _traceback_tail(stack.splitlines()) if stack else msg.get("message")
        return str(msg)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes: a flow run of the `r1-stage` deployment; inside the pod the stage runs locally or under torchrun


def _run_kubernetes(stage, recipe, overrides, parent_run_id, spec: LaunchSpec, log) -> dict:
    from prefect.deployments import run_deployment

    inner = LaunchSpec(target="torchrun" if spec.nproc_per_node > 1 else "local",
                       nproc_per_node=spec.nproc_per_node, master_port=spec.master_port, env=spec.env,
                       module=spec.module, timeout=spec.timeout, workdir=spec.workdir)
    recipe_param = str(recipe) if isinstance(recipe, (str, Path)) else _recipe_obj(recipe, None).model_dump(mode="json")
    params = {"stage": stage, "recipe": recipe_param, "overrides": overrides or {}, "parent_run_id": parent_run_id,
              "launch": inner.model_dump(mode="json")}
    log(f"running deployment {spec.deployment} for stage {stage} with job variables {k8s_job_variables(spec)}")
    fr = run_deployment(name=spec.deployment, parameters=params, job_variables=k8s_job_variables(spec),
                        timeout=spec.timeout)
    state = fr.state
    if state is None or not state.is_completed():
        raise LaunchError(f"stage {stage}: flow run {fr.name} ({fr.id}) ended "
                          f"{getattr(state, 'type', None)}: {getattr(state, 'message', '')}")
    try:
        return state.result()
    except Exception as e:  # any storage error means the same thing here
        raise LaunchError(f"stage {stage}: flow run {fr.name} completed but its result could not be read ({e}); "
                          "the pods and this process need shared result storage (PREFECT_LOCAL_STORAGE_PATH on a "
                          "shared volume, or PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: see docs/scaling.md)") from e


@flow(name="r1-stage", persist_result=True, log_prints=True)
def r1_stage(stage: str, recipe: str | dict = "tiny", overrides: dict | None = None, parent_run_id: str | None = None,
             launch: LaunchSpec | None = None) -> dict:
    """One stage where this flow runs (a Kubernetes pod): in-process, or torchrun over the pod's GPUs."""
    return launch_stage(stage, recipe, overrides, parent_run_id, launch or LaunchSpec())
