"""Tiny stand-ins for `stages.entry`, launched by the launcher tests: `python -m tests.launch_targets NAME [...]`.

Same command line as `stages.entry` (NAME --recipe --overrides --parent-run-id --result-file), so the launcher cannot
tell them apart. Targets:
  ok             gloo all_reduce of (rank + 1) over all ranks; rank 0 writes the sum and its arguments as JSON
  fail           rank 1 raises an error with a distinctive message; rank 0 waits at a barrier (torchrun must end it)
  fail_recorded  like `fail`, under torch.distributed.elastic's @record (the error goes to the rank's error.json)
  zero2          one DeepSpeed ZeRO-2 step of a 2-layer model on CPU (gloo), config from $R1_TEST_DS_CONFIG
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FAIL_MESSAGE = "launch-target failure on rank 1: the distinctive message"


def _init():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _write(path: Path | None, data: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")  # atomic, like stages.entry
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def ok(args) -> None:
    import torch
    import torch.distributed as dist

    rank, world = _init()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    print(f"rank {rank}/{world}: all_reduce sum {t.item()}", flush=True)
    if rank == 0:
        _write(args.result_file, {"sum": t.item(), "world_size": world, "stage": args.stage, "recipe": args.recipe,
                                  "overrides": json.loads(args.overrides), "parent_run_id": args.parent_run_id,
                                  "env": os.environ.get("R1_TEST_ENV")})
    dist.destroy_process_group()


def fail(args) -> None:
    import torch.distributed as dist

    rank, _ = _init()
    if rank == 1:
        raise RuntimeError(FAIL_MESSAGE)
    print(f"rank {rank}: waiting at a barrier that rank 1 never reaches", flush=True)
    dist.barrier()


def zero2(args) -> None:
    import deepspeed
    import torch

    rank, _ = _init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    config = json.loads(Path(os.environ["R1_TEST_DS_CONFIG"]).read_text())
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    config.pop("train_batch_size", None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # our loops pass their own optimizer (README there)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    if rank == 0:
        _write(args.result_file, {"loss": loss.item(), "zero_stage": engine.zero_optimization_stage(),
                                  "world_size": engine.world_size})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["ok", "fail", "fail_recorded", "zero2"])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--parent-run-id", default=None)
    parser.add_argument("--result-file", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.stage == "fail_recorded":
        from torch.distributed.elastic.multiprocessing.errors import record

        record(fail)(args)
    else:
        {"ok": ok, "fail": fail, "zero2": zero2}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
