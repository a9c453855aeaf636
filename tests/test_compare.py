"""`r1 compare`: readable in 80 columns, machine-readable with --json/--csv, and refusing what does not exist."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import re
import threading
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.compare import FAIL_FAST_HTTP, FIELDS, KEY_METRICS

LOGGED = {
    "r1_zero": {"eval/pass_at_1": 0.123456789, "eval/greedy_accuracy": 0.5, "eval/format_rate": 0.75,
                "eval/language_consistency": 1.0, "eval/mean_completion_tokens": 123.456},
    "cold_start_sft": {"eval/pass_at_1": 0.987654321, "eval/greedy_accuracy": 0.25, "eval/format_rate": 0.0625,
                       "eval/language_consistency": 0.875, "eval/mean_completion_tokens": 45.5},
}
ODD_STAGE = "[red]odd[/red]"  # MLflow text that must print literally, never as rich markup


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with one pipeline run, two finished stage runs, a running one and one with an odd stage tag."""
    import mlflow

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("r1-test")
    pipeline = client.create_run(exp, tags={"r1.stage": "pipeline"}).info.run_id
    runs = {}
    for stage, metrics in LOGGED.items():
        run = client.create_run(exp, tags={"r1.stage": stage, "r1.pipeline_run_id": pipeline}).info.run_id
        for k, v in metrics.items():
            client.log_metric(run, k, v)
        client.set_terminated(run)
        runs[stage] = run
        time.sleep(0.01)  # distinct start times: newest first is well defined
    runs["reasoning_rl"] = client.create_run(exp, tags={"r1.stage": "reasoning_rl"}).info.run_id  # still running
    runs[ODD_STAGE] = client.create_run(exp, tags={"r1.stage": ODD_STAGE}).info.run_id
    client.set_terminated(runs[ODD_STAGE])
    client.set_terminated(pipeline)
    return {"uri": uri, "db": folder / "mlflow.db", "pipeline": pipeline, "runs": runs,
            "args": ["--set", f"tracking.uri={uri}", "--set", "tracking.experiment=r1-test"]}


def r1(*args, columns=80):
    return CliRunner().invoke(app, ["compare", *args], env={"COLUMNS": str(columns)})


def test_table_fits_80_columns_with_key_columns_whole(store):
    res = r1(*store["args"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in res.stdout
    assert lines[0].split() == ["stage", "run", "pass@1", "greedy", "format", "lang", "tokens", "finished"]
    r1_zero = next(line for line in lines if line.startswith("r1_zero"))
    assert r1_zero.split()[:7] == ["r1_zero", store["runs"]["r1_zero"][:8], "0.123", "0.500", "0.750", "1.000", "123"]
    assert next(line for line in lines if line.startswith("reasoning_rl")).split()[-1] == "running"
    assert any(line.startswith(ODD_STAGE) for line in lines)  # printed literally, brackets and all
    assert [line.split()[0] for line in lines[2:]] == [ODD_STAGE, "reasoning_rl", "cold_start_sft", "r1_zero"]


def test_narrow_terminal_gets_one_block_per_run(store):
    res = r1(*store["args"], "--stage", "r1_zero", columns=40)
    assert res.exit_code == 0, res.output
    head, *metrics = res.stdout.splitlines()
    assert re.fullmatch(rf"r1_zero  {store['runs']['r1_zero'][:8]}  \d\d-\d\d \d\d:\d\d", head)
    assert metrics == ["  pass@1 0.123  greedy 0.500", "  format 0.750  lang 1.000", "  tokens 123"]


def test_json_round_trips_the_logged_numbers(store):
    res = r1(*store["args"], "--json")
    assert res.exit_code == 0, res.output
    rows = {r["run_id"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {store["runs"][s] for s in [*LOGGED, "reasoning_rl", ODD_STAGE]}
    for stage, metrics in LOGGED.items():
        row = rows[store["runs"][stage]]
        assert {m: row[m] for m in KEY_METRICS} == metrics
        assert row["stage"] == stage and row["pipeline_run_id"] == store["pipeline"] and row["status"] == "FINISHED"
        assert row["started"] <= row["finished"]
    assert rows[store["runs"][ODD_STAGE]]["stage"] == ODD_STAGE
    running = rows[store["runs"]["reasoning_rl"]]
    assert running["finished"] is None and running["eval/pass_at_1"] is None and running["status"] == "RUNNING"


def test_csv_parses_with_full_names_and_precision(store):
    res = r1(*store["args"], "--csv", "--pipeline-run", store["pipeline"])
    assert res.exit_code == 0, res.output
    reader = csv.DictReader(io.StringIO(res.stdout))
    assert tuple(reader.fieldnames) == FIELDS
    rows = {r["stage"]: r for r in reader}
    assert set(rows) == set(LOGGED)  # only this pipeline run's stages
    for stage, metrics in LOGGED.items():
        assert {m: float(rows[stage][m]) for m in KEY_METRICS} == metrics
        assert rows[stage]["run_id"] == store["runs"][stage]


def test_json_and_csv_together_are_refused(store):
    res = r1(*store["args"], "--json", "--csv")
    assert res.exit_code == 2 and res.stderr.strip() == "--json and --csv: pick one"


def test_no_matching_run_exits_1(store):
    res = r1(*store["args"], "--stage", "distill")
    assert res.exit_code == 1 and "no stage runs in experiment 'r1-test'" in res.stdout


def _refused(res, message: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_unknown_stage_lists_the_stages(store):
    _refused(r1(*store["args"], "--stage", "r1-zero"),
             "unknown stage 'r1-zero'; stages: base_model, r1_zero, cold_start_sft, reasoning_rl, synthesize")


def test_unknown_pipeline_run_says_so(store):
    _refused(r1(*store["args"], "--pipeline-run", "0123456789abcdef"),
             "no pipeline run '0123456789abcdef' in experiment 'r1-test'")
    stage_run = store["runs"]["r1_zero"]
    _refused(r1(*store["args"], "--pipeline-run", stage_run), f"run '{stage_run}' is a 'r1_zero' run, not a pipeline")


def test_unknown_experiment_lists_the_experiments(store):
    _refused(r1("--set", f"tracking.uri={store['uri']}", "--set", "tracking.experiment=nope"),
             f"no experiment 'nope' at {store['uri']}; experiments: ")


def test_missing_sqlite_store_is_refused_and_not_created(tmp_path, monkeypatch):
    db = tmp_path / "elsewhere" / "mlflow.db"
    _refused(r1("--set", f"tracking.uri=sqlite:///{db}"), f"no tracking store at {db}: run a pipeline first or pass")
    _refused(r1("--set", f"tracking.uri=file://{tmp_path}/mlruns"), f"no tracking store at {tmp_path / 'mlruns'}")
    monkeypatch.chdir(tmp_path)  # the tiny preset's own sqlite:///mlflow.db, relative to here
    for args in [(), ("--stage", "r1_zero"), ("--pipeline-run", "abc"), ("--json",)]:
        _refused(r1(*args), f"no tracking store at {tmp_path / 'mlflow.db'}")
    assert list(tmp_path.rglob("*")) == []


def test_unreachable_server_is_refused_in_seconds():
    t0 = time.monotonic()
    res = r1("--set", "tracking.uri=http://127.0.0.1:9")
    _refused(res, "MLflow tracking server http://127.0.0.1:9 is unreachable")
    assert time.monotonic() - t0 < 15


class _Failing(http.server.BaseHTTPRequestHandler):
    """Healthy, but every API call answers 503: MLflow would retry it with backoff for minutes."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_server_that_fails_queries_is_refused_without_retries():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        t0 = time.monotonic()
        _refused(r1("--set", f"tracking.uri={uri}"), f"tracking store {uri}: ")
        assert time.monotonic() - t0 < 15
    finally:
        server.shutdown()
    assert not any(k in os.environ for k in FAIL_FAST_HTTP)  # set for the command only
