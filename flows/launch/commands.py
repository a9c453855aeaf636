"""The command lines: the entry point's arguments, `torchrun` on one node, the DeepSpeed launcher over a hostfile."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from flows.launch.spec import LaunchSpec


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
