"""A stage on several ranks (torchrun, the DeepSpeed launcher, Slurm): one process group per stage; every rank trains,
rank 0 alone talks to MLflow and writes the stage's outputs.

`stages.entry` calls `init_from_env()` when a launcher started several ranks; a stage run in-process never has a process
group. This module is the launch side; the rank helpers (rank, is_main, broadcast, barrier, all-reduce) are grpo.distributed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # stages/core/distributed.py -> the repository

# Stages whose run() works on N ranks (their trainer shards the batch under DeepSpeed ZeRO, or their rejection sampling
# the generation batches, stages.core.sharding; rank 0 logs). The others (base_model, preference_rl, distill) run on
# rank 0 alone when launched on several: the rest exit at once.
DISTRIBUTED_STAGES = frozenset({"r1_zero", "reasoning_rl", "cold_start_sft", "general_sft", "synthesize"})


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / the DeepSpeed launcher (1 when started without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_from_env() -> None:
    """Join the launcher's process group: NCCL with each rank on its LOCAL_RANK GPU, gloo on CPU.

    The timeout (R1_DIST_TIMEOUT_MINUTES, default 120) is long because the other ranks wait in a collective while rank
    0 does work of its own (e.g. sampling the cold-start set before SFT).
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    minutes = float(os.environ.get("R1_DIST_TIMEOUT_MINUTES", "120"))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)


def leave_process_group() -> None:
    """Leave together at the end of a stage: wait for every rank, then destroy the process groups. Groups left to the
    interpreter's exit can abort a rank ("terminate called without an active exception", seen with gloo on 2 ranks),
    and torchrun then stops the others mid-save."""
    import torch.distributed as dist  # lazy: preflight reads this module

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def deepspeed_config(recipe, own: str | None = None) -> dict | None:
    """The DeepSpeed config a training stage uses: its own `deepspeed_config`, else the recipe's
    `cluster.deepspeed_config` (a path, relative to the working folder or to the repository).

    Only under a launcher's process group: a stage run in-process trains on one process with plain torch (DeepSpeed
    itself would need a launcher), so the file is then not used, and that is logged.
    """
    path = own or recipe.cluster.deepspeed_config
    if path is None:
        return None
    from grpo.distributed import is_distributed  # lazy: imports torch (preflight reads this module)

    if not is_distributed():
        log.info("DeepSpeed config %s not used: the stage runs in-process (one process, plain torch); launch it with "
                 "cluster.launcher torchrun/deepspeed/slurm to train under DeepSpeed", path)
        return None
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"DeepSpeed config {path}: cannot be read as JSON ({e})") from e
