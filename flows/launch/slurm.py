"""Slurm: the sbatch script (`srun torchrun` with a c10d rendezvous on the job's first node), and cancelling the job."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.launch.spec import REPO_ROOT, LaunchSpec


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


def scancel(output: list[str]) -> None:
    """Cancel the Slurm job whose id `sbatch --parsable` printed first (killing `sbatch --wait` leaves it running)."""
    job = next((ln.split(";")[0].strip() for ln in output if ln.split(";")[0].strip().isdigit()), None)
    if job:
        try:
            subprocess.run(["scancel", job], check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
