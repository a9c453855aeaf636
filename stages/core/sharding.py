"""Data-parallel, resumable rejection sampling (synthesis, cold-start sampling): every rank of the launch generates its
own share of the generation batches into its own shards; rank 0 merges them in batch order.

Ownership: with W generating ranks (the launch's ranks; one per tensor-parallel group of vLLM engines), batch b is
rank b mod W's. Batches are seeded by index (stages.core.rejection), so batch b's samples do not depend on who
generates it, and the merge (rows in batch order, cut at the target, counts of the batches it used) equals one rank's.

Rounds and stopping: round t is batches tW .. tW+W-1, one per rank. After its batch of round t a rank starts a
non-blocking all-reduce of what it kept there (rows and sample counts: 10 numbers) and collects round t-1's, so the
ranks learn the rows of every round one round late, without waiting for each other at every batch (a rank may run
one round ahead of the slowest). Once those rows reach the target every rank stops after the same round, at most one
round past the one that reached it; the merge drops the rows past the target. On one rank nothing is all-reduced and
it stops at the batch that reaches the target. A rank stores a batch's rows only up to what the target may still need
(the target minus the rows it knows come before), so one rank stores exactly the rows it keeps.

Shards: `<shard_dir>/rank-<r>/shard-NNNNN`, `shard_size` rows each (rows + state.json, written under a temporary name
and renamed: whole or absent). The state says where the rank is: its next batch, rows of its consumed batches not yet
in a shard (carry), and each consumed batch's stored-row count and counts. A rerun resumes every rank from its own
last shard (a rank's finished shards are never regenerated); shards written by another number of ranks are refused,
since batch ownership would differ.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpo.faults import fault_point
from stages.core import console
from stages.core.data import load_rows, save_rows
from stages.core.rejection import Counts, RejectionSampler

log = logging.getLogger(__name__)


class ShardWorldSizeError(RuntimeError):
    """The work dir's shards were written by another number of generating ranks."""


@dataclass(frozen=True)
class GenerationRank:
    """This process among the generating ranks: a vLLM engine spans `tensor_parallel_size` consecutive ranks, which
    generate the same batches; the first of them (`writer`) writes the shards."""

    rank: int
    world: int
    writer: bool


def generation_rank(tensor_parallel_size: int = 1) -> GenerationRank:
    from grpo.distributed import rank_and_world  # lazy: imports torch

    rank, world = rank_and_world()
    if world % tensor_parallel_size:
        raise ValueError(f"vllm_tensor_parallel_size={tensor_parallel_size} does not divide the {world} ranks")
    return GenerationRank(rank // tensor_parallel_size, world // tensor_parallel_size, rank % tensor_parallel_size == 0)


def owned_batches(num_batches: int, gen: GenerationRank) -> range:
    """The batches this rank generates: batch b is rank b mod W's."""
    return range(gen.rank, num_batches, gen.world)


def gather_in_batch_order(mine: dict[int, list], gen: GenerationRank) -> list | None:
    """Every rank's per-batch results (batch index -> items) on rank 0, concatenated in batch order; None elsewhere.
    For results small enough to travel as pickled objects (evaluation completions), not for bulk sets (shards)."""
    import torch

    from grpo.distributed import is_distributed  # lazy: imports torch

    if not is_distributed():
        return [x for b in sorted(mine) for x in mine[b]]
    parts = [None] * torch.distributed.get_world_size() if gen.rank == 0 else None
    torch.distributed.gather_object(mine if gen.writer else {}, parts, dst=0)
    if gen.rank != 0 or not gen.writer:
        return None
    merged = {b: items for part in parts for b, items in part.items()}
    return [x for b in sorted(merged) for x in merged[b]]


def start_sum_over_ranks(values: list[float]) -> Callable[[], list[float]]:
    """Start an element-wise sum over all ranks without waiting for it; the returned function waits and gives it (the
    identity on one process). On the collective backend's device (NCCL: this rank's GPU)."""
    import torch

    from grpo.distributed import collective_device, is_distributed  # lazy: imports torch

    if not is_distributed():
        return lambda: list(values)
    x = torch.tensor(values, dtype=torch.float64, device=collective_device())
    work = torch.distributed.all_reduce(x, async_op=True)

    def result() -> list[float]:
        work.wait()
        return x.tolist()

    return result


def sum_over_ranks(values: list[float]) -> list[float]:
    return start_sum_over_ranks(values)()


def summed(counts) -> Counts:
    total = Counts()
    for c in counts:
        total.add(c)
    return total


# ---- shard files ---------------------------------------------------------------------------------------------------

def rank_dir(shard_dir: Path, rank: int) -> Path:
    return Path(shard_dir) / f"rank-{rank}"


def shard_path(rank_shards: Path, i: int) -> Path:
    return Path(rank_shards) / f"shard-{i:05d}"


def write_shard(rank_shards: Path, i: int, rows: list[dict], state: dict) -> Path:
    """Rows and state into a temporary folder, then one rename: a shard is whole or absent."""
    final = shard_path(rank_shards, i)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if rows:
        save_rows(rows, tmp / "rows")
    fault_point("shard_write", i + 1, by_stage=False)
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_shards(rank_shards: Path, clean: bool = True) -> tuple[list[dict], dict | None]:
    """Rows of the finished shards 0, 1, ... up to the first missing one, and the last one's state. With `clean`,
    shards after a gap (and unfinished temporaries) are stale: removed, their batches are redone."""
    rows, state, i = [], None, 0
    while (shard_path(rank_shards, i) / "state.json").exists():
        d = shard_path(rank_shards, i)
        state = json.loads((d / "state.json").read_text())
        if state["rows"]:
            rows.extend(load_rows(d / "rows"))
        i += 1
    if clean and Path(rank_shards).exists():
        for stale in Path(rank_shards).glob("shard-*"):
            if stale.name.endswith(".tmp") or int(stale.name.split("-")[1]) >= i:
                shutil.rmtree(stale, ignore_errors=True)
    return rows, state


def check_world(shard_dir: Path, world: int) -> None:
    """Refuse shards written by another number of generating ranks (every rank reads the same files: all refuse)."""
    for d in sorted(Path(shard_dir).glob("rank-*")):
        states = sorted(d.glob("shard-*[0-9]/state.json"))
        written = json.loads(states[-1].read_text()).get("world") if states else None
        if written is not None and (written != world or int(d.name.split("-")[1]) >= world):
            raise ShardWorldSizeError(f"the shards in {shard_dir} were written by {written} generating ranks and this "
                                      f"run has {world}: resume it with {written}, or delete {shard_dir} to start over")


# ---- the loop ------------------------------------------------------------------------------------------------------

def sample_sharded(sampler: RejectionSampler, load_backend: Callable[[], object], target: int, shard_dir: Path,
                   shard_size: int, *, gen: GenerationRank, label: str, progress: bool = True,
                   fault_kind: str | None = None, on_shard: Callable[[int, int, Counts], None] | None = None,
                   on_sync: Callable[[int, int, Counts], None] | None = None) -> tuple[list[dict], Counts] | None:
    """Rejection-sample up to `target` rows on every rank; rank 0 returns the merged (rows, counts), the others None.

    load_backend: builds the sampler's backend (loads the model) the first time this rank has a batch to generate.
    fault_kind: the fault point fired after each shard (step: shards this rank wrote). on_shard(shard index, rows in
    this rank's shards, counts of its batches): after each shard it writes; on_sync(batches done, rows kept, counts):
    after each all-reduce, with the numbers over all ranks.
    """
    if target <= 0 or sampler.num_batches == 0:
        return ([], Counts()) if gen.rank == 0 and gen.writer else None
    from grpo.distributed import barrier  # lazy: imports torch

    check_world(shard_dir, gen.world)
    mine = rank_dir(shard_dir, gen.rank)
    if gen.writer:
        in_shards, state = load_shards(mine)
    barrier()  # stale temporaries are gone before a tensor-parallel peer reads the same folder
    if not gen.writer:
        in_shards, state = load_shards(mine, clean=False)
    W, num_batches = gen.world, sampler.num_batches
    consumed: dict[int, tuple[int, Counts]] = {b: (n, Counts.from_json(c)) for b, n, c in
                                               (state or {}).get("batches", [])}
    buffer = list(state["carry"]) if state else []
    shard, kept_in_shards = (state["shard"] + 1 if state else 0), len(in_shards)
    done = bool(state and state["done"])
    next_batch = state["next_batch"] if state else gen.rank
    if state and not done:
        log.info("%s: %sresuming after shard %d (%d rows) at generation batch %d", label,
                 f"rank {gen.rank}: " if W > 1 else "", state["shard"], len(in_shards), next_batch)
    rounds = -(-num_batches // W)
    own_round = [0.0] * W
    if gen.writer:
        own_round[gen.rank] = float((next_batch - gen.rank) // W)
    start = int(min(sum_over_ranks(own_round)))  # every rank restarts at the least advanced rank's next round

    def kept_in(rounds_: range) -> list[float]:
        """Rows stored and counts of this rank's batches in those rounds (a tensor-parallel peer: nothing, its writer
        counts them)."""
        mine_ = [(n, c) for b, (n, c) in consumed.items() if b // W in rounds_] if gen.writer else []
        return [float(sum(n for n, _ in mine_))] + summed(c for _, c in mine_).to_vector()

    total = sum_over_ranks(kept_in(range(start)))
    known, known_counts = int(total[0]), Counts.from_vector(total[1:])  # every rank's rows in the rounds < synced
    synced, pending = start, []  # all-reduces started, not yet collected (one round behind on several ranks)
    shown = progress and gen.rank == 0 and gen.writer
    bar = console.progress(target, label, shown, initial=min(known, target), unit="sample")
    generated, t = 0, start

    def collect(keep: int) -> None:
        """Add the started all-reduces to what is known, all but the last `keep`."""
        nonlocal known, known_counts, synced
        while len(pending) > keep:
            total = pending.pop(0)()
            known, previous = known + int(total[0]), known
            known_counts.add(Counts.from_vector(total[1:]))
            synced += 1
            bar.update(min(known, target) - min(previous, target))
            bar.set_postfix(prompts=known_counts.prompts, accept=f"{known_counts.acceptance_rate:.0%}")
            if on_sync:
                on_sync(min(synced * W, num_batches), known, known_counts)

    def flush(last: bool) -> None:
        """Full shards from the buffer (all of it, at least one shard, when `last`)."""
        nonlocal buffer, shard, kept_in_shards
        while len(buffer) >= shard_size or last:
            chunk, buffer = buffer[:shard_size], buffer[shard_size:]
            finished = last and not buffer
            batches = [[b, n, c.to_json()] for b, (n, c) in sorted(consumed.items())]
            write_shard(mine, shard, chunk, {"shard": shard, "rows": len(chunk), "world": W, "next_batch": next_batch,
                                             "carry": buffer, "batches": batches, "done": finished})
            kept_in_shards += len(chunk)
            if on_shard:
                on_shard(shard, kept_in_shards, summed(c for _, c in consumed.values()))
            if fault_kind:
                fault_point(fault_kind, shard + 1)
            shard += 1
            if finished:
                return

    stopping = known >= target or start >= rounds
    if stopping and gen.writer and not done:  # killed while writing the last shards: write the rest, generate nothing
        flush(last=True)
    while not stopping:
        b = t * W + gen.rank
        if b < num_batches and b not in consumed and not done:
            if sampler.backend is None:
                sampler.backend = load_backend()
            rows, counts = sampler.sample_batch(b)
            # rows known to come before b: every rank's in the rounds synced, and this rank's own since
            before = known + sum(n for bb, (n, _) in consumed.items() if synced <= bb // W and bb < b)
            take = rows[: max(0, target - before)]
            consumed[b] = (len(take), counts)
            buffer.extend(take)
            next_batch, generated = b + W, generated + 1
        pending.append(start_sum_over_ranks(kept_in(range(t, t + 1))))
        collect(keep=0 if W == 1 else 1)
        t += 1
        stopping = known >= target or t >= rounds
        if gen.writer and not done:
            flush(last=stopping)
    collect(keep=0)
    bar.close()
    if generated:
        log.info("%s: rank %d generated %d batches in this attempt", label, gen.rank, generated)
    barrier()  # every rank's last shard is written
    if gen.rank == 0 and gen.writer:
        return merge_shards(shard_dir, W, target)
    return None


def merge_shards(shard_dir: Path, world: int, target: int) -> tuple[list[dict], Counts]:
    """The rows of all ranks' shards in batch order, cut at `target`, and the counts of the batches that gave them:
    what one rank generating every batch in order keeps."""
    per_batch: dict[int, tuple[list[dict], Counts]] = {}
    for r in range(world):
        rows, state = load_shards(rank_dir(shard_dir, r), clean=False)
        if state is None:
            continue
        rows, i = rows + state["carry"], 0
        for b, n, c in state["batches"]:
            per_batch[b], i = (rows[i : i + n], Counts.from_json(c)), i + n
    out, total = [], Counts()
    for b in range(max(per_batch, default=-1) + 1):
        if len(out) >= target:
            break
        if b not in per_batch:
            raise RuntimeError(f"{shard_dir}: generation batch {b} is in no rank's shards (rows so far {len(out)} of "
                               f"{target}); delete the folder to sample again")
        rows, counts = per_batch[b]
        out.extend(rows[: target - len(out)])
        total.add(counts)
    return out, total
