"""Fault injection, for the reliability tests: kill this process at a chosen point, the way a preemption would.

    R1_FAULT_KILL_AT=r1_zero:3,synthesize:1    SIGKILL right after step 3 of stage r1_zero (its metrics logged and its
                                               checkpoint written if one was due), and after shard 1 of synthesize
    R1_FAULT_RAISE_AT=r1_zero:3                raise InjectedFault there instead (an exception: a crash the process
                                               survives, e.g. to exercise in-process Prefect retries)
    R1_FAULT_ONCE_DIR=/tmp/faults              each point fires once: a marker file is written there before the kill,
                                               so a retry or a rerun of the same stage gets past it

A point names a stage (set by the stage's context) or a loop kind: `grpo`, `sft` (every SFT loop, base-model
pretraining included) or `synthesize` (its shards), or a write in progress: `checkpoint_write` (a checkpoint's files
written, not yet renamed into place) or `shard_write` (a shard's rows written, not yet renamed). Steps count from 1 (a
synthesize shard is its index + 1, i.e. the number of shards written). Unset (the normal case), `fault_point` is an
environment lookup and returns.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_ENV = "R1_FAULT_KILL_AT"
RAISE_ENV = "R1_FAULT_RAISE_AT"
ONCE_ENV = "R1_FAULT_ONCE_DIR"


class InjectedFault(RuntimeError):
    """The exception R1_FAULT_RAISE_AT raises."""

_stage: str | None = None


def set_stage(name: str | None) -> None:
    """The stage now running in this process (stages.core.context.stage_context sets it)."""
    global _stage
    _stage = name


def _points(spec: str) -> set[tuple[str, int]]:
    out = set()
    for item in spec.split(","):
        name, _, step = item.strip().rpartition(":")
        if name and step.isdigit():
            out.add((name, int(step)))
    return out


def fault_point(kind: str, step: int, by_stage: bool = True) -> None:
    """SIGKILL this process (R1_FAULT_KILL_AT) or raise InjectedFault (R1_FAULT_RAISE_AT) if it names (stage or kind,
    step); a no-op when neither is set. Points inside a write (`checkpoint_write`, `shard_write`: before the rename that
    publishes it) answer to their kind only (by_stage=False)."""
    for env, kill in ((KILL_ENV, True), (RAISE_ENV, False)):
        spec = os.environ.get(env)
        if spec and (name := _fires(_points(spec), kind, step, by_stage)):
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"injected fault at {name}:{step} ({env})")


def _fires(points: set[tuple[str, int]], kind: str, step: int, by_stage: bool) -> str | None:
    for name in (_stage if by_stage else None, kind):
        if name is None or (name, step) not in points:
            continue
        once = os.environ.get(ONCE_ENV)
        if once:
            marker = Path(once) / f"{name}-{step}-rank{os.environ.get('RANK', '0')}"
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
        return name
    return None
