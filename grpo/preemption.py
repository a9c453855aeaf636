"""Stopping before the scheduler kills the run: a stop request is noted at once and acted on at the next step boundary,
where the loop writes a checkpoint and raises `Preempted`; the stage's entry point then exits with `REQUEUE_EXIT` and
the requeued job resumes from that checkpoint (same stage key, same work dir).

A request is SIGUSR1 to the process, or the file named by R1_STOP_FILE appearing: the Slurm batch script touches it
when its time-limit signal comes (torchrun's agent has no SIGUSR1 handler, so the signal cannot be forwarded through
it; the file reaches every rank on every node through the shared work dir). The handler only sets a flag: a rank that
left mid-step (inside a collective or a checkpoint write) would hang the others and leave no checkpoint.
Torch is imported only when a request is checked: the launch side reads this module's names.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"
STOP_FILE_ENV = "R1_STOP_FILE"  # a stop request when this file exists
PREEMPTED_FILE_ENV = "R1_PREEMPTED_FILE"  # rank 0 writes it once the checkpoint is complete: the job may be requeued
STOP_SIGNAL = signal.SIGUSR1

_requested = False
_votes = None  # the process group of the ranks' votes: gloo on the CPU, apart from the engine's collectives


class Preempted(RuntimeError):
    """The run was asked to stop (time limit near, preemption); a checkpoint of step `step` was written first."""

    def __init__(self, loop: str, step: int, checkpoint: Path | None):
        self.loop, self.step, self.checkpoint = loop, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no output_dir, or weights not finite)"
        super().__init__(f"{loop} stopped on request after step {step}: {where}; rerun the same stage to resume")


def listen() -> None:
    """Note SIGUSR1 as a stop request (from the main thread; elsewhere Python cannot install handlers: a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, _note)


def _note(signum, frame) -> None:
    global _requested
    _requested = True


def requested_here() -> bool:
    stop_file = os.environ.get(STOP_FILE_ENV)
    return _requested or bool(stop_file and Path(stop_file).exists())


def stop_requested() -> bool:
    """Whether any rank was asked to stop. Ranks see a signal or the file at different moments, so on several ranks
    they agree (a MAX all-reduce, one number per step, in a gloo group of its own: on the default group it would
    interleave with DeepSpeed's own collectives) and all save the same step."""
    import torch  # lazy: the launch side (flows.launch.slurm) imports this module without torch
    import torch.distributed as dist

    from grpo.distributed import is_distributed  # lazy: imports torch

    global _votes
    local = requested_here()
    if not is_distributed() or dist.get_world_size() == 1:
        return local
    if _votes is None:  # every rank gets here at the same step: a collective, once
        _votes = dist.new_group(backend="gloo")
    flag = torch.tensor([float(local)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_votes)
    return bool(flag.item())


def record(stop: Preempted) -> None:
    """Write R1_PREEMPTED_FILE (when set): the batch script requeues the job only after it; torchrun reports every
    failed rank as exit 1, so REQUEUE_EXIT does not reach the script through it."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps({"loop": stop.loop, "step": stop.step, "checkpoint": str(stop.checkpoint or "")}))
        os.replace(tmp, path)
