"""Entry point of one stage in its own process: `python -m stages.entry NAME --recipe R [...]`.

Launchers (in-process, torchrun, DeepSpeed, Slurm, Kubernetes) all run this. Rank 0 writes the stage's outputs (run id
and artifact URIs) as JSON to `--result-file`, atomically, so the launching task can read them back. It ends as the
`r1` CLI does (stages/core/errors.py): our own errors one message and exit 2, anything else a short line, the traceback
file (and torchrun's error.json) and exit 1, SIGINT/SIGTERM (what a launcher forwards) one line and exit 130, with the
stage's MLflow run marked KILLED. `R1_DEBUG=1` lets tracebacks through.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from grpo import preemption
from stages import registry
from stages.core import console, distributed, errors
from stages.core.jsonio import write_json_atomic
from stages.core.order import check_stages
from stages.core.recipe import load_recipe


def _record_for_torchrun(e: BaseException) -> None:
    """torchrun's error recording (error.json, which the launcher reports), for an unexpected error only: our own
    errors reach the launcher as their one line on stderr."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler
    except ImportError:  # pragma: no cover
        return
    handler = get_error_handler()
    handler.initialize()
    handler.record_exception(e)


def main(argv: list[str] | None = None) -> int:
    errors.raise_on_signals()
    try:
        return run(argv)
    except Exception as e:  # the same outcome as the CLI's (flows/cli.py: _handled)
        if os.environ.get("R1_DEBUG") == "1":
            raise
        code, message = errors.outcome(e)
        if code == errors.EXIT_UNEXPECTED:
            _record_for_torchrun(e)
        print(message, file=sys.stderr, flush=True)
        return code
    except KeyboardInterrupt as e:
        errors.handled()
        print(errors.outcome(e)[1], file=sys.stderr, flush=True)
        return errors.EXIT_INTERRUPTED


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.entry", description=__doc__)
    parser.add_argument("stage", help="stage name")
    parser.add_argument("--recipe", default="tiny", help="preset name or YAML path")
    parser.add_argument("--overrides", default="{}", help="JSON object of dotted-key overrides")
    parser.add_argument("--inputs", default="{}", help='JSON object of input URIs, e.g. {"model": "runs:/<id>/model"}')
    parser.add_argument("--parent-run-id", default=None, help="MLflow run id of the pipeline run")
    parser.add_argument("--result-file", type=Path, default=None, help="where rank 0 writes the outputs as JSON")
    args = parser.parse_args(argv)
    console.setup()  # the launching process's mode (R1_CONSOLE)
    preemption.listen()  # from the start: a stop request while the model loads must not kill the process

    check_stages([args.stage])
    recipe = load_recipe(args.recipe, json.loads(args.overrides))
    if distributed.launched_world_size() > 1:
        if args.stage not in distributed.DISTRIBUTED_STAGES:  # rank 0 runs it as one process, the others leave
            if distributed.launched_rank() != 0:
                return 0
            logging.getLogger(__name__).info("stage %s runs on rank 0 alone (it has no multi-rank path)", args.stage)
        else:
            distributed.init_from_env()
    try:
        out = registry.runnable()[args.stage](recipe, inputs=json.loads(args.inputs) or None,
                                              parent_run_id=args.parent_run_id, progress=True)
    except preemption.Preempted as stop:  # checkpoint written: the batch script requeues, the rerun resumes
        logging.getLogger(__name__).warning("%s", stop)
        if distributed.launched_rank() == 0:
            preemption.record(stop)
        distributed.leave_process_group()
        return preemption.REQUEUE_EXIT
    if args.result_file and distributed.launched_rank() == 0:
        write_json_atomic(args.result_file, out)
    distributed.leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
