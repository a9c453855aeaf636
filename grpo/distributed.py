"""Ranks, for every loop and stage: who am I, how many are we, and the collectives the loops need. Without a process
group (one process, the in-process case) everything here is the identity: rank 0 of 1.

Launch-side things (joining the launcher's process group, the DeepSpeed config of a stage) are stages.core.distributed's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_and_world()[0]


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes to MLflow and to the result file."""
    return rank() == 0


def broadcast(obj):
    """Rank 0's `obj` on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def collective_device() -> torch.device:
    """Where a tensor built from Python numbers must live to be reduced: this rank's GPU under NCCL (it reduces CUDA
    tensors only), else the CPU (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks, as a new tensor (a copy on one process)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return x.detach().clone()
    y = x.detach().to(collective_device(), copy=True)  # rewards and counts live on the CPU; NCCL reduces CUDA tensors
    dist.all_reduce(y)
    return y.to(x.device)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over ranks (identity on one process)."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def all_reduce_weighted_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """Σ_r w_r·v_r / Σ_r w_r over ranks, e.g. per-token metrics weighted by each rank's token count."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64,
                     device=collective_device())
    dist.all_reduce(t)
    return {k: v / max(t[-1].item(), 1e-12) for k, v in zip(keys, t[:-1].tolist())}


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (identity on one process)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    return all_reduce_sum(x) / world


def all_reduce_max(value: float) -> float:
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
