"""Attempts of a stage: what happens to MLflow and the work directory when a stage is rerun after a crash.

A stage's work directory is keyed by its stage key, so a rerun (a Prefect retry, a rerun of the pipeline, `r1 stage`)
finds the checkpoints or shards the killed attempt left and resumes from them. In MLflow:

- Every attempt is its own run (tag `r1.stage_key` as always). A rerun marks the earlier attempts that were left
  RUNNING (a killed process never ends its run) as KILLED, tags them `r1.resumed_by=<new run>`, and tags itself
  `r1.resumed_from=<newest earlier attempt>`.
- No step is logged twice in a run. The new run starts with the earlier attempts' per-step metrics (steps >= 1) up to
  the step it resumes from, copied when its first step is logged (or at its end if it logs none), and continues from
  there; the steps the killed attempt logged after its last checkpoint are recomputed (exactly: resume is bit-exact)
  and logged once. Params the trainer logs only at step 0 (e.g. `grpo.*`) are copied too. Stage-level values (step 0:
  data counts, evaluation) are logged afresh by the new attempt.
- An interrupt (Ctrl-C, SIGTERM: `killed_on_interrupt`) ends the run KILLED at once, not FAILED (MLflow's status for
  any exception), and keeps the work directory: the rerun resumes it like a killed process's.
- One process at a time per work directory: a lock file (`.lock`, fcntl) refuses a second concurrent run of the same
  stage key; the kernel releases it when its process dies, even on SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from grpo.logging import MLflowLogger
from stages.core.errors import Interrupted, handled, is_interrupt

log = logging.getLogger(__name__)

RESUMED_FROM = "r1.resumed_from"
RESUMED_BY = "r1.resumed_by"
LOCK_FILE = ".lock"

# run id -> earlier attempts (oldest first) whose per-step metrics it takes over; prefixes already copied
_sources: dict[str, list[str]] = {}
_copied: dict[str, set[str]] = {}
_wanted: dict[str, set[str]] = {}


class StageBusyError(RuntimeError):
    """Another live process is running the same stage (same key, same work directory)."""


@contextlib.contextmanager
def work_lock(workdir: Path, stage: str):
    """Hold `<workdir>/.lock` for the stage's lifetime; fail at once, naming the holder, if another process has it."""
    path = Path(workdir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise StageBusyError(f"stage {stage}: work dir {workdir} is in use by another run of the same stage "
                                 f"(pid {holder}, lock {path}); wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def killed_on_interrupt(run_id: str, what: str, workdir: Path | None = None):
    """Around an open MLflow run: an interrupt ends it KILLED and goes on as `Interrupted`, whose text (the one line
    the user sees) says what stopped, its run and where its checkpoints stay."""
    try:
        yield
    except BaseException as e:
        if not is_interrupt(e):
            raise
        handled()
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run("KILLED")
        else:
            mlflow.MlflowClient().set_terminated(run_id, "KILLED")
        if isinstance(e, Interrupted) and str(e).startswith("interrupted:"):  # an inner run already said what stopped
            raise
        kept = f"; its work dir {workdir} is kept and a rerun resumes from its last checkpoint" if workdir else ""
        raise Interrupted(f"interrupted: {what} stopped, MLflow run {run_id[:8]} marked KILLED{kept}") from None


def earlier_attempts(experiment_id: str, key_tag: str, key: str, run_id: str) -> list:
    """Runs with this stage key started after its newest FINISHED one (not `run_id`), newest first."""
    import mlflow

    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.`{key_tag}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=200, output_format="list")
    out = []
    for r in runs:
        if r.info.run_id == run_id:
            continue
        if r.info.status == "FINISHED":
            break
        out.append(r)
    return out


def begin(experiment_id: str, key_tag: str, key: str, run_id: str) -> list[str]:
    """Link the new run `run_id` to the unfinished earlier attempts of the same stage key (call under work_lock);
    returns their ids, newest first."""
    import mlflow

    client = mlflow.MlflowClient()
    earlier = earlier_attempts(experiment_id, key_tag, key, run_id)
    _sources[run_id] = [r.info.run_id for r in reversed(earlier)]
    _copied[run_id], _wanted[run_id] = set(), set()
    if not earlier:
        return []
    client.set_tag(run_id, RESUMED_FROM, earlier[0].info.run_id)
    for r in earlier:
        if r.info.status == "RUNNING":  # its process is gone (we hold the work dir's lock): it was killed
            client.set_terminated(r.info.run_id, "KILLED")
        client.set_tag(r.info.run_id, RESUMED_BY, run_id)
    have = set(client.get_run(run_id).data.params)
    params = {}
    for r in earlier:  # newest first: keep the newest value (they are equal: same stage key, same config)
        params.update({k: v for k, v in r.data.params.items() if k not in have and k not in params})
    _log_batch(client, run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    log.info("MLflow run %s resumes the work of %s", run_id, ", ".join(r.info.run_id for r in earlier))
    return [r.info.run_id for r in earlier]


def backfill(run_id: str, prefix: str = "", before: int | None = None) -> int:
    """Once per (run, prefix): copy the earlier attempts' metrics named `prefix*` at steps 1 .. before-1 (all steps
    >= 1 when `before` is None) into `run_id`, the newest attempt's value winning. Returns the number copied."""
    if not _sources.get(run_id) or prefix in _copied.setdefault(run_id, set()):
        return 0
    _copied[run_id].add(prefix)
    import mlflow

    client = mlflow.MlflowClient()
    others = tuple(p for p in _wanted.get(run_id, ()) if len(p) > len(prefix) and p.startswith(prefix))
    entries: dict[tuple[str, int], object] = {}
    for source in _sources[run_id]:  # oldest first
        for key in client.get_run(source).data.metrics:
            if not key.startswith(prefix) or (others and key.startswith(others)):  # another logger's metrics
                continue
            for m in client.get_metric_history(source, key):
                if m.step >= 1 and (before is None or m.step < before):
                    entries[(key, m.step)] = m
    _log_batch(client, run_id, metrics=list(entries.values()))
    return len(entries)


def finish(run_id: str) -> None:
    """At the stage's successful end: backfill for every logger that never logged (it resumed at its last step)."""
    for prefix in sorted(_wanted.get(run_id, ())):
        backfill(run_id, prefix)
    for d in (_sources, _copied, _wanted):
        d.pop(run_id, None)


def _log_batch(client, run_id: str, metrics=(), params=()) -> None:
    metrics, params = list(metrics), list(params)
    for i in range(0, len(metrics), 1000):  # MLflow's batch limits
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def stage_logger(run_id: str, prefix: str = ""):
    """The per-step metric logger of a stage run: an MLflowLogger that first takes over the earlier attempts' steps."""
    class ResumingLogger(MLflowLogger):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            backfill(self.run_id, self.prefix, before=step)
            super().log_metrics(metrics, step)

    _wanted.setdefault(run_id, set()).add(prefix)
    return ResumingLogger(run_id=run_id, prefix=prefix)
