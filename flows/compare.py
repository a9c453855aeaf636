"""`r1 compare`: key metrics of stage runs side by side, from MLflow (the MLflow UI's compare view has the plots).

Read only: a store that does not exist is refused rather than created, and a dead server is refused in seconds.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
from pathlib import Path
from urllib.parse import urlparse

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from stages.core.order import ORDER
from stages.core.tracking import EVALUATES_TAG, EVALUATION, PIPELINE_TAG, STAGE_TAG, TrackingError, check_tracking

# full MLflow name -> (short label, format) for the table
KEY_METRICS = {
    "eval/pass_at_1": ("pass@1", "{:.3f}"),
    "eval/greedy_accuracy": ("greedy", "{:.3f}"),
    "eval/format_rate": ("format", "{:.3f}"),
    "eval/language_consistency": ("lang", "{:.3f}"),
    "eval/mean_completion_tokens": ("tokens", "{:.0f}"),
}
FIELDS = ("run_id", "stage", "pipeline_run_id", "status", "started", "finished", *KEY_METRICS)
# benchmark metrics (stages.core.benchmarks): bench/<benchmark>/<metric>, shown in a table of their own
BENCH_PREFIX = "bench/"
BENCH_METRICS = {"samples": "n", "pass_at_1": "pass@1", "cons_at_k": "cons@n", "pass_k": "k", "pass_at_k": "pass@k"}

# MLflow retries a failing server for about 4 minutes by default (7 retries with backoff, 120 s timeout each);
# a listing should fail in seconds
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class CompareError(ValueError):
    """A comparison that cannot be made: no store, an unreachable server, an unknown stage or pipeline run."""


@contextlib.contextmanager
def fail_fast_http():
    """FAIL_FAST_HTTP for the duration of the query (a user's own setting wins), restored afterwards."""
    saved = {k: os.environ.get(k) for k in FAIL_FAST_HTTP}
    for k, v in FAIL_FAST_HTTP.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_store(tracking) -> None:
    """Refuse a local store that does not exist (MLflow would create one just to read it) or a server that does
    not answer /health."""
    uri = tracking.uri
    hint = "run a pipeline first or pass --set tracking.uri=... (sqlite:///path/mlflow.db or http://host:port)"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise CompareError(f"no tracking store at {db.resolve()}: {hint}")
    elif uri.startswith(("http://", "https://")):
        try:
            check_tracking(tracking)
        except TrackingError as e:
            raise CompareError(str(e)) from None
    elif urlparse(uri).scheme in ("", "file"):
        folder = Path(urlparse(uri).path if uri.startswith("file:") else uri)
        if not folder.is_dir():
            raise CompareError(f"no tracking store at {folder.resolve()}: {hint}")


def _time(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")


def _check_pipeline_run(client, exp, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.experiment_id != exp.experiment_id:
        raise CompareError(f"no pipeline run {run_id!r} in experiment {exp.name!r}")
    if run.data.tags.get(STAGE_TAG) != "pipeline":
        raise CompareError(f"run {run_id!r} is a {run.data.tags.get(STAGE_TAG, 'untagged')!r} run, not a pipeline run")


def compare_rows(recipe, stage: str | None = None, pipeline_run_id: str | None = None,
                 limit: int = 20) -> list[dict]:
    """One dict per stage run (newest first): FIELDS, times as ISO 8601, metrics by full name (None if not logged).
    CompareError for an unknown stage, a store that does not exist or does not answer (before MLflow would create
    or retry it), an unknown experiment or pipeline run."""
    if stage is not None and stage not in ORDER:
        raise CompareError(f"unknown stage {stage!r}; stages: {', '.join(ORDER)}")
    check_store(recipe.tracking)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, name = recipe.tracking.uri, recipe.tracking.experiment
    with fail_fast_http():
        try:
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = [e.name for e in client.search_experiments()]
                raise CompareError(f"no experiment {name!r} at {uri}; experiments: {', '.join(known)}")
            filters = [f"tags.`{STAGE_TAG}` != 'pipeline'"]
            if stage:
                filters.append(f"tags.`{STAGE_TAG}` = '{stage}'")
            if pipeline_run_id:
                _check_pipeline_run(client, exp, pipeline_run_id)
                filters.append(f"tags.`{PIPELINE_TAG}` = '{pipeline_run_id}'")
            runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(filters),
                                      order_by=["attributes.start_time DESC"], max_results=limit)
        except MlflowException as e:
            raise CompareError(f"tracking store {uri}: {str(e).splitlines()[0]}") from None
    return [{"run_id": r.info.run_id, "stage": _stage(r.data.tags),
             "pipeline_run_id": r.data.tags.get(PIPELINE_TAG), "status": r.info.status,
             "started": _time(r.info.start_time), "finished": _time(r.info.end_time),
             **{m: r.data.metrics.get(m) for m in KEY_METRICS},
             **{m: v for m, v in sorted(r.data.metrics.items()) if m.startswith(BENCH_PREFIX)}} for r in runs]


def _stage(tags: dict[str, str]) -> str:
    """A run's stage; `<stage> eval` for a run that re-evaluated a reused stage's model under new eval settings."""
    stage = tags.get(STAGE_TAG, "?")
    return f"{tags.get(EVALUATES_TAG, '?')} eval" if stage == EVALUATION else stage


def _short(row: dict) -> dict[str, str]:
    """The table's cells: 8-character run id, finished as MM-DD HH:MM (or the status of an unfinished run)."""
    done = row["status"] == "FINISHED" and row["finished"]
    cells = {"stage": row["stage"], "run": row["run_id"][:8],
             "finished": row["finished"][5:16].replace("T", " ") if done else row["status"].lower()}
    for m, (label, fmt) in KEY_METRICS.items():
        cells[label] = "" if row[m] is None else fmt.format(row[m])
    return cells


def table(rows: list[dict]) -> Table:
    """Key columns first; Text cells so MLflow values print literally, never as rich markup."""
    labels = ["stage", "run", *[label for label, _ in KEY_METRICS.values()], "finished"]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for label in labels:
        t.add_column(label, justify="left" if label in ("stage", "run", "finished") else "right", no_wrap=True)
    for row in rows:
        cells = _short(row)
        t.add_row(*[Text(cells[label]) for label in labels])
    return t


def bench_scores(row: dict) -> dict[str, dict[str, str]]:
    """benchmark -> {label: cell} of a row's bench/<benchmark>/<metric> values."""
    out: dict[str, dict[str, str]] = {}
    for key, value in row.items():
        name, _, metric = key.removeprefix(BENCH_PREFIX).rpartition("/")
        if key.startswith(BENCH_PREFIX) and metric in BENCH_METRICS and value is not None:
            out.setdefault(name, {})[BENCH_METRICS[metric]] = f"{value:.0f}" if metric in ("samples", "pass_k") else f"{value:.3f}"
    return out


def bench_table(rows: list[dict]) -> Table | None:
    """One line per (run, benchmark), or None when no run logged a benchmark."""
    labels = ["stage", "run", "benchmark", *BENCH_METRICS.values()]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for label in labels:
        t.add_column(label, justify="left" if label in labels[:3] else "right", no_wrap=True)
    for row in rows:
        cells = _short(row)
        for name, scores in bench_scores(row).items():
            t.add_row(*[Text(x) for x in (cells["stage"], cells["run"], name)],
                      *[Text(scores.get(label, "")) for label in BENCH_METRICS.values()])
    return t if t.row_count else None


def blocks(rows: list[dict]) -> list[Text]:
    """One block per run for a terminal too narrow for the table: stage, run, finished, then the logged metrics."""
    out = []
    for row in rows:
        cells = _short(row)
        metrics = [f"{label} {cells[label]}" for label, _ in KEY_METRICS.values() if cells[label]]
        lines = [f"{cells['stage']}  {cells['run']}  {cells['finished']}"]
        lines += ["  " + "  ".join(metrics[i : i + 2]) for i in range(0, len(metrics), 2)]
        lines += [f"  {name}: " + "  ".join(f"{label} {v}" for label, v in scores.items())
                  for name, scores in bench_scores(row).items()]
        out.append(Text("\n".join(lines)))
    return out


def print_rows(console: Console, rows: list[dict]) -> None:
    """The table when it fits the console's width (COLUMNS is honoured by rich), else one block per run."""
    t, bench = table(rows), bench_table(rows)
    if all(Measurement.get(console, console.options.update_width(10_000), x).maximum <= console.width
           for x in (t, bench) if x is not None):
        console.print(t)
        if bench is not None:
            console.print()
            console.print(bench)
        return
    for b in blocks(rows):
        console.print(b)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    bench = sorted({k for r in rows for k in r if k.startswith(BENCH_PREFIX)})
    writer = csv.DictWriter(buf, fieldnames=[*FIELDS, *bench], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # floats as repr: full precision; None as an empty cell
    return buf.getvalue()
