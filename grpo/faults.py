"""Fault injection, for the reliability tests: kill this process at a chosen point, the way a preemption would.

    R1_FAULT_KILL_AT=r1_zero:3,synthesize:1    SIGKILL right after step 3 of stage r1_zero (its metrics logged and its
                                               checkpoint written if one was due), and after shard 1 of synthesize
    R1_FAULT_ONCE_DIR=/tmp/faults              each point fires once: a marker file is written there before the kill,
                                               so a retry or a rerun of the same stage gets past it

A point names a stage (set by the stage's context) or a loop kind: `grpo`, `sft` (every SFT loop, base-model
pretraining included) or `synthesize` (its shards). Steps count from 1 (a synthesize shard is its index + 1, i.e. the
number of shards written). Unset (the normal case), `fault_point` is a dictionary lookup and returns.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_ENV = "R1_FAULT_KILL_AT"
ONCE_ENV = "R1_FAULT_ONCE_DIR"

_stage: str | None = None


def set_stage(name: str | None) -> None:
    """The stage now running in this process (stages.common.stage_context sets it)."""
    global _stage
    _stage = name


def _points(spec: str) -> set[tuple[str, int]]:
    out = set()
    for item in spec.split(","):
        name, _, step = item.strip().rpartition(":")
        if name and step.isdigit():
            out.add((name, int(step)))
    return out


def fault_point(kind: str, step: int) -> None:
    """SIGKILL this process if R1_FAULT_KILL_AT names (stage or kind, step)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    points = _points(spec)
    for name in (_stage, kind):
        if name is not None and (name, step) in points:
            once = os.environ.get(ONCE_ENV)
            if once:
                marker = Path(once) / f"{name}-{step}-rank{os.environ.get('RANK', '0')}"
                if marker.exists():
                    continue
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
