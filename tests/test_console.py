"""What a run prints: the logging setup, step lines, GRPO samples, the pipeline's summary, `r1 serve`'s shutdown, and the
output of a short real pipeline run through the CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.core import console
from tests.conftest import MINI

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def logs(capsys):
    """console.setup(mode) writing to the captured stderr; logging, warnings and the environment restored afterwards
    (setup exports its mode and the libraries' quiet settings, PREFECT_LOGGING_LEVEL among them, for child processes:
    left behind, they reached the subprocesses of every later test)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, warnings.showwarning, dict(os.environ))
    levels = {n: logging.getLogger(n).level for n in (*console.OURS, console.STAGE_LOG, "httpx")}

    def setup(mode):
        console.setup(mode)
        return lambda: capsys.readouterr().err

    yield setup
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    warnings.showwarning = saved[2]
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    os.environ.clear()
    os.environ.update(saved[3])
    console._mode = "normal"


def test_modes_show_our_lines_never_third_party_info(logs):
    out = logs("normal")
    logging.getLogger("httpx").info('HTTP Request: GET http://x/api/health "HTTP/1.1 200 OK"')
    logging.getLogger("stages.x").info("ours")
    logging.getLogger("stages.x").debug("our detail")
    console.stage_log.info("▶ r1_zero started")
    text = out()
    assert "ours" in text and "▶ r1_zero started" in text
    assert "HTTP Request" not in text and "our detail" not in text

    out = logs("quiet")
    logging.getLogger("stages.x").info("ours")
    logging.getLogger("stages.x").warning("careful")
    console.stage_log.info("■ r1_zero finished")
    text = out()
    assert "ours" not in text and "careful" in text and "■ r1_zero finished" in text

    out = logs("verbose")
    logging.getLogger("stages.x").debug("our detail")
    logging.getLogger("httpx").info("HTTP Request: POST")
    logging.getLogger("httpx").debug("HTTP Request: POST")
    text = out()
    assert "our detail" in text and "HTTP Request" not in text


def test_a_warning_prints_once_whether_logged_or_warned(logs):
    out = logs("normal")
    msg = "synthesize kept 3 of 10 reasoning samples"
    logging.getLogger("stages.synthesize").warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=1)
    warnings.warn(msg, UserWarning, stacklevel=1)
    logging.getLogger("stages.synthesize").warning("another one")
    lines = out().splitlines()
    assert sum(msg in line for line in lines) == 1
    assert sum("another one" in line for line in lines) == 1


def test_setup_refuses_an_unknown_mode(monkeypatch):
    monkeypatch.setenv(console.MODE_ENV, "loud")
    with pytest.raises(ValueError, match="R1_CONSOLE='loud'"):
        console.setup()


def test_step_lines_every_n_steps_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, "stages.progress")
    bar = console.StepLines(12, "r1_zero", every=5, seconds=1e9)
    for step in range(12):
        bar.set_postfix({"reward": 0.25 * step})
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [re.search(r"step (\d+)/12", line)[1] for line in lines] == ["5", "10", "12"]
    assert lines[0].startswith("r1_zero step 5/12 · reward 1 · ") and "s/step" in lines[0] and "ETA" in lines[0]
    assert "reward 2.75" in lines[2] and lines[2].endswith("ETA 0s")


def test_step_lines_every_n_seconds_and_not_before_min_seconds(caplog, monkeypatch):
    caplog.set_level(logging.INFO, "stages.progress")
    clock = iter([0.0, 10.0, 31.0, 35.0, 70.0])  # t0, then one reading per update
    # console's own clock only: patching time.monotonic itself fed this clock to every thread of the process too
    # (Prefect's event-loop thread, alive after any test that ran a flow, drew readings and exhausted it)
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    bar = console.StepLines(100, "sft", every=1000, seconds=30)
    for _ in range(4):
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["sft step 2/100 · 15.50 s/step · ETA 25m19s", "sft step 4/100 · 17.50 s/step · ETA 28m00s"]

    caplog.clear()
    clock = iter([0.0, 5.0, 6.0])
    quiet = console.StepLines(2, "evaluate", min_seconds=30)
    quiet.update(1)
    quiet.update(1)
    assert caplog.records == []


def test_step_logger_forwards_metrics_and_reports_the_logged_step(caplog):
    caplog.set_level(logging.INFO, "stages.progress")
    from grpo.logging import ConsoleLogger

    inner = ConsoleLogger(printer=lambda line: None)
    steps = console.StepLogger(inner, console.StepLines(10, "r1_zero", every=5, seconds=1e9))
    steps.log_metrics({"reward/mean": 0.5, "accuracy": 0.25, "kl": 0.002, "lr": 1e-4}, step=5)
    steps.log_metrics({"reward/mean": 0.75, "accuracy": 0.5, "kl": 0.004, "lr": 1e-4}, step=10)
    assert [s for s, _ in inner.history] == [5, 10]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("r1_zero step 5/10 · reward 0.5 · accuracy 0.25 · kl 0.002 · ")
    assert lines[1].startswith("r1_zero step 10/10 · reward 0.75 · accuracy 0.5 · kl 0.004 · ")


def test_grpo_samples_every_fifth_of_the_run_first_and_best_truncated(caplog, mini_recipe):
    import torch

    from stages.core.context import StageContext
    from stages.core.grpo_runner import sample_printer

    caplog.set_level(logging.INFO, "stages.core.grpo_runner")
    cfg = mini_recipe.r1_zero.model_copy(update={"grpo": mini_recipe.r1_zero.grpo.model_copy(
        update={"iterations": 1, "steps_per_iteration": 10})})
    ctx = StageContext("r1_zero", mini_recipe, "run", "key", Path("."), {}, False)
    hook = sample_printer(ctx, cfg, {"r": 1.0}, width=24)

    class FakeRollout:
        completions = ("first\n<think>a</think>", "b", "the best one, and it goes on and on")

    for step in range(1, 11):
        hook(step, FakeRollout, {"r": [0.0, 0.5, 1.5]}, torch.zeros(3))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"r1_zero step {s} sample (reward {r}): {t}" for s in (2, 4, 6, 8, 10)
                     for r, t in (("0.00", "first <think>a</think>"), ("1.50", "the best one, and it go…"))]
    caplog.clear()
    off = sample_printer(ctx, cfg.model_copy(update={"samples_to_log": 0}), {"r": 1.0})
    off(2, FakeRollout, {"r": [0.0, 0.5, 1.5]}, torch.zeros(3))
    assert caplog.records == []


def test_stage_status_in_the_summary():
    from flows.pipeline import stage_status

    chain = ["base_model", "r1_zero", "cold_start_sft", "reasoning_rl"]
    outputs = {"base_model": {"run_id": "a"}, "r1_zero": {"run_id": "b"}}
    assert [stage_status(n, chain, outputs, ["base_model"]) for n in chain] == ["reused", "ran", "failed", "not run"]


class Records(logging.Handler):
    """Keeps what a logger emits. Attached to the logger itself, not the root: the first `import prefect` of a process
    runs Prefect's dictConfig, which drops the root's handlers (pytest's caplog with them), so a caplog check of a
    module that imports Prefect passed or failed depending on whether an earlier test had imported it already."""

    def __init__(self, name: str, level: int):
        super().__init__(level)
        self.logger, self.records = logging.getLogger(name), []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.saved = self.logger.level
        self.logger.setLevel(self.level)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved)


def test_serve_stops_when_the_server_is_gone(monkeypatch):
    """Pausing the schedules on Ctrl-C is bounded: a server that never answers costs PAUSE_TIMEOUT, then a warning."""
    from prefect.runner import Runner

    from flows import deployments

    async def never_answers(self):
        await asyncio.sleep(3600)

    monkeypatch.setattr(Runner, "_pause_schedules", never_answers)
    monkeypatch.setattr(deployments, "PAUSE_TIMEOUT", 0.2)
    runner = deployments.ServeRunner()
    t0 = time.monotonic()
    with Records("flows.deployments", logging.WARNING) as seen:
        asyncio.run(runner._pause_schedules())
    assert time.monotonic() - t0 < 5
    assert [r.getMessage().split(":")[0] for r in seen.records] == ["r1 serve stopped; schedules left active"]


def test_a_short_pipeline_prints_stage_lines_and_step_lines_without_noise(tmp_path):
    """`r1 pipeline` (base_model + r1_zero, tiny sizes) with its output captured, as in CI or a log file."""
    sets = {**MINI, "r1_zero.grpo.steps_per_iteration": 4, "r1_zero.grpo.prompts_per_step": 4,
            "r1_zero.grpo.num_generations": 2, "r1_zero.grpo.log_every": 2}
    args = [sys.executable, "-c", "from flows.cli import main; main()", "pipeline", "--recipe", "tiny",
            "--stage", "base_model", "--stage", "r1_zero"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop(console.MODE_ENV, None)
    res = subprocess.run(args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    for stage in ("base_model", "r1_zero"):
        assert re.search(rf"▶ {stage} started · MLflow run \w{{8}}", out), out
        end = re.search(rf"■ {stage} finished in \d+s · pass@1 [\d.]+ · greedy [\d.]+ · format [\d.]+ · language "
                        rf"[\d.]+ · http://127.0.0.1:5000/#/experiments/\d+/runs/\w{{32}}", out)
        assert end, out
    assert re.search(r"pretrain step 8/8 · loss [\d.]+ · lr .* s/step · ETA 0s", out), out
    assert re.search(r"r1_zero step 2/4 · reward .* · kl .* s/step · ETA", out), out
    assert re.search(r"r1_zero step 4 sample \(reward -?[\d.]+\): ", out), out
    for noise in ("HTTP Request:", "Downloading artifacts", "Loading weights", "Writing model shards", "LOAD_",
                  "Saving the dataset", "Creating initial MLflow database"):
        assert noise not in out, noise
    warning_lines = [line.split(" ", 1)[1] for line in out.splitlines() if " WARNING " in line]
    assert len(warning_lines) == len(set(warning_lines)), warning_lines


def test_pipeline_runs_are_named_after_recipe_and_stage(monkeypatch):
    """Prefect's flow-run name says recipe and stage (its default is two random words). Tested on the name function:
    Prefect's own "Beginning flow run" line is missing from a subprocess's output in about one run in four."""
    from types import SimpleNamespace

    from flows import pipeline

    monkeypatch.setattr(pipeline, "current_flow_run", SimpleNamespace(parameters={"recipe": "recipes/my-run.yaml"}))
    assert re.fullmatch(r"my-run · pipeline · \d{4}-\d\d-\d\d \d\d:\d\d", pipeline.pipeline_run_name())
    monkeypatch.setattr(pipeline, "current_flow_run", SimpleNamespace(parameters={"recipe": "tiny"}))
    assert pipeline.pipeline_run_name().startswith("tiny · pipeline · ")
