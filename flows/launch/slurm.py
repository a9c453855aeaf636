"""Slurm: the sbatch script (`srun torchrun` with a c10d rendezvous on the job's first node), and cancelling the job.

Runs longer than the partition's time limit: `--signal=B:USR1@<lead>` signals the batch shell alone, `lead` seconds
before the limit. Without `B:` Slurm would signal every process of the job step, torchrun's agent included, which has
no SIGUSR1 handler and would die with the ranks mid-step. The shell's trap touches the stop file every rank polls at
its step boundaries (grpo.preemption); the ranks checkpoint and exit, rank 0 writes the preempted file, and the script
then runs `scontrol requeue` (the job needs `--requeue`): the same job id goes back to PENDING (so `sbatch --wait` keeps
waiting), gets a fresh time limit, and its stage resumes from the checkpoint (same stage key, same work dir).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.launch.spec import REPO_ROOT, LaunchSpec
from grpo.preemption import PREEMPTED_FILE_ENV, STOP_FILE_ENV

STOP_FILE = "stop-requested"
PREEMPTED_FILE = "preempted.json"


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
    lines += [f"#SBATCH --time={spec.time_limit}", f"#SBATCH --output={workdir / 'slurm-%j.out'}",
              "#SBATCH --open-mode=append",  # a requeued job appends to its output file instead of truncating it
              "#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{spec.checkpoint_before_limit}"]
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
              "export PYTHONUNBUFFERED=1",
              f"export {STOP_FILE_ENV}={q(str(workdir / STOP_FILE))}",
              f"export {PREEMPTED_FILE_ENV}={q(str(workdir / PREEMPTED_FILE))}"]
    lines += [f"export {k}={q(v)}" for k, v in spec.env.items()]
    # each node's torchrun tees its ranks' output into its own folder under torchrun-logs/ (found again on failure)
    torchrun = ["srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", '"$SLURM_NNODES"', "--nproc-per-node",
                str(nproc), "--rdzv-id", '"$SLURM_JOB_ID"', "--rdzv-backend", "c10d", "--rdzv-endpoint",
                '"$MASTER_ADDR:$MASTER_PORT"', "--log-dir", q(str(workdir / "torchrun-logs")), "--tee", "3",
                "-m", spec.module, *[q(a) for a in args]]
    lines += ["", *requeue_lines(" \\\n    ".join(torchrun)), ""]
    return "\n".join(lines)


def requeue_lines(command: str) -> list[str]:
    """`command` in the background (bash runs a trap only between commands, so not while a foreground srun runs),
    the USR1 trap, the wait that outlasts the trap, and the requeue once rank 0 says its checkpoint is written."""
    return [f'rm -f "${STOP_FILE_ENV}" "${PREEMPTED_FILE_ENV}"',
            f'trap \'echo "r1: time limit near (SIGUSR1): the stage checkpoints and stops"; touch "${STOP_FILE_ENV}"\' USR1',
            command + " &",
            "step=$!",
            "status=0",
            'while true; do  # a trap ends `wait` early (status > 128) while srun still runs: wait again',
            '    wait "$step" && status=0 || status=$?',
            '    kill -0 "$step" 2>/dev/null || break',
            "done",
            f'if [ -f "${PREEMPTED_FILE_ENV}" ]; then',
            '    echo "r1: checkpoint written; requeueing job $SLURM_JOB_ID (the stage resumes from it)"',
            f'    rm -f "${STOP_FILE_ENV}"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "    exit 0",
            "fi",
            'exit "$status"']


def scancel(output: list[str]) -> None:
    """Cancel the Slurm job whose id `sbatch --parsable` printed first (killing `sbatch --wait` leaves it running)."""
    job = next((ln.split(";")[0].strip() for ln in output if ln.split(";")[0].strip().isdigit()), None)
    if job:
        try:
            subprocess.run(["scancel", job], check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
