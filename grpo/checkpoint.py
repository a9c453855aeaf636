"""Checkpoints that resume exactly: policy, optimiser, scheduler (through the engine), reference model, RNG states,
data position and step counters.

A checkpoint is written into `<name>.tmp` and renamed into place, so a crash never leaves a half-written `checkpoint-N`;
`trainer_state.json` is written last and marks a complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from grpo.engine import rank_and_world

STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(path: str | Path, engine, reference: torch.nn.Module | None, trainer_state: dict) -> Path:
    """Write a checkpoint atomically at `path`. Every rank calls it (DeepSpeed saves are collective)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank, _ = rank_and_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0 and reference is not None:
        torch.save(reference.state_dict(), tmp / "reference.pt")
    _barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_checkpoint(path: str | Path, engine, reference: torch.nn.Module | None) -> dict:
    """Restore engine, reference (if given) and this rank's RNG; returns the trainer state dict."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    engine.load(str(path))
    if reference is not None:
        reference.load_state_dict(torch.load(path / "reference.pt", weights_only=True))
    rank, _ = rank_and_world()
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-<step>` directories, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for p in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
