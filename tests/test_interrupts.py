"""Ctrl-C and SIGTERM: a run stops within seconds with one line (exit 130), its MLflow runs end KILLED and its Prefect
runs Cancelled, the checkpoints stay, and a rerun resumes; a stage's own process (what launchers run) ends the same
way, and its errors print one message (no traceback)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import MINI

ROOT = Path(__file__).resolve().parents[1]
R1 = [sys.executable, "-c", "from flows.cli import main; main()"]
# r1_zero long enough to be interrupted after a checkpoint, short enough to finish on the rerun
RL = {"r1_zero.grpo.prompts_per_step": 4, "r1_zero.grpo.num_generations": 2, "r1_zero.grpo.steps_per_iteration": 40,
      "r1_zero.grpo.checkpoint_every": 4, "r1_zero.grpo.log_every": 1, "r1_zero.grpo.max_completion_length": 12,
      "r1_zero.samples_to_log": 0}
INTERRUPTED = re.compile(r"^interrupted: stage r1_zero stopped, MLflow run (\w{8}) marked KILLED; its work dir "
                         r"runs/r1_zero/\w+ is kept and a rerun resumes from its last checkpoint$")


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # a new database on a loaded machine
    env.pop("PREFECT_API_URL", None)  # a temporary Prefect server, whose database is PREFECT_HOME/prefect.db
    return env


def _sets(over: dict) -> list[str]:
    return [x for k, v in over.items() for x in ("--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]


def _checkpoint(tmp_path: Path) -> Path | None:
    done = sorted(tmp_path.glob("runs/r1_zero/*/checkpoints/checkpoint-*/trainer_state.json"))
    return done[-1].parent if done else None


def _interrupt_after_a_checkpoint(proc: subprocess.Popen, tmp_path: Path, log: Path, sig, group: bool,
                                  timeout: float = 600) -> tuple[float, str]:
    """Wait for r1_zero's first complete checkpoint, send `sig` (to the process group: a terminal's Ctrl-C), return
    (seconds until the process ended, what it printed after the signal)."""
    deadline = time.monotonic() + timeout
    while _checkpoint(tmp_path) is None:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    before = len(log.read_text())
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t0, log.read_text()[before:]


def _runs(uri: str) -> dict[str, list]:
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("r1-tiny")
    runs = mlflow.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], output_format="list")
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags["r1.stage"], []).append(r)
    return out


def _prefect_states(tmp_path: Path) -> tuple[list, list]:
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        flows = db.execute("select state_type from flow_run order by created").fetchall()
        tasks = db.execute("select name, state_type from task_run order by created").fetchall()
    return [f[0] for f in flows], tasks


def test_ctrl_c_stops_the_pipeline_in_seconds_and_a_rerun_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*R1, "pipeline", "--recipe", "tiny", "--stage", "base_model", "--stage", "r1_zero",
            *_sets({**MINI, **RL, "tracking.uri": uri})]
    log = tmp_path / "first.log"
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    seconds, after = _interrupt_after_a_checkpoint(proc, tmp_path, log, signal.SIGINT, group=True)
    kept = _checkpoint(tmp_path)

    assert proc.returncode == 130, after
    assert seconds < 10, f"{seconds:.1f} s to stop"
    lines = after.strip().splitlines()
    assert len(lines) == 1 and INTERRUPTED.match(lines[0]), after  # one line: no traceback, no HTTP noise
    runs = _runs(uri)
    assert [r.info.status for r in runs["base_model"]] == ["FINISHED"]
    (killed,) = runs["r1_zero"]
    assert killed.info.status == "KILLED" and killed.info.run_id.startswith(INTERRUPTED.match(lines[0]).group(1))
    assert [r.info.status for r in runs["pipeline"]] == ["KILLED"]
    flows, tasks = _prefect_states(tmp_path)
    assert flows == ["CANCELLED"]
    assert [t for t in tasks if "r1_zero" in t[0]] == [("tiny · r1_zero", "CANCELLED")]
    assert ("tiny · base_model", "COMPLETED") in tasks

    # the rerun reuses base_model and resumes r1_zero from the checkpoint the interrupt left
    res = subprocess.run(args, check=False, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert re.search(rf"stage r1_zero: resuming from .*{kept.name}", out), out[-3000:]
    assert "■ base_model reused (unchanged since run" in out, out[-3000:]
    runs = _runs(uri)
    assert [r.info.status for r in runs["r1_zero"]] == ["KILLED", "FINISHED"]
    assert runs["r1_zero"][1].data.tags["r1.resumed_from"] == killed.info.run_id
    assert len(runs["base_model"]) == 1


def test_ctrl_c_reaches_a_stage_running_under_torchrun(tmp_path):
    """The stage runs in torchrun's worker (its own session: a terminal's Ctrl-C does not reach it): the pipeline
    process stops the launch (SIGTERM, which torchrun forwards), the worker ends its MLflow run KILLED, and the user
    sees one line, not the worker's."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    over = {**MINI, **RL, "tracking.uri": uri, "cluster.launcher": "torchrun", "cluster.nproc_per_node": 1}
    args = [*R1, "pipeline", "--recipe", "tiny", "--stage", "base_model", "--stage", "r1_zero", *_sets(over)]
    log = tmp_path / "torchrun.log"
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    seconds, after = _interrupt_after_a_checkpoint(proc, tmp_path, log, signal.SIGINT, group=True)
    assert proc.returncode == 130 and seconds < 15, (proc.returncode, seconds, after)  # torchrun's own shutdown
    assert after.strip().splitlines() == ["interrupted: stage r1_zero stopped"], after
    runs = _runs(uri)
    assert [r.info.status for r in runs["r1_zero"]] == ["KILLED"]
    assert [r.info.status for r in runs["pipeline"]] == ["KILLED"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stage_process_ends_killed_on_a_signal(sig, mini_base, tmp_path):
    """`python -m stages.entry` as a launcher runs it (torchrun forwards SIGTERM; `r1 stage` gets a Ctrl-C), with SIGINT
    ignored as in a background job: the handler is installed explicitly."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    over = {**MINI, **RL, "tracking.uri": uri}
    cmd = [sys.executable, "-m", "stages.entry", "r1_zero", "--recipe", "tiny", "--overrides", json.dumps(over),
           "--inputs", json.dumps({"model": mini_base})]
    if sig == signal.SIGINT:
        cmd = [*R1, "stage", "r1_zero", "--input-model", mini_base, *_sets(over)]
    log = tmp_path / "stage.log"
    ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]  # as `cmd &` in a script starts it
    proc = subprocess.Popen([*ignoring_sigint, *cmd], cwd=tmp_path, env=_env(tmp_path), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    seconds, after = _interrupt_after_a_checkpoint(proc, tmp_path, log, sig, group=False)
    assert proc.returncode == 130 and seconds < 10, (proc.returncode, seconds, after)
    lines = after.strip().splitlines()
    assert len(lines) == 1 and INTERRUPTED.match(lines[0]), after
    assert [r.info.status for r in _runs(uri)["r1_zero"]] == ["KILLED"]


def test_a_stage_process_prints_its_own_error_in_one_line(tmp_path):
    """A refusal under a launcher: one message on stderr, exit 2, no traceback, no error.json (the launcher shows
    the message)."""
    over = {**MINI, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"}
    env = {**_env(tmp_path), "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json")}
    res = subprocess.run([sys.executable, "-m", "stages.entry", "r1_zero", "--recipe", "tiny", "--overrides",
                          json.dumps(over), "--inputs", json.dumps({"model": "/no/such/model"})], check=False,
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["preflight: 1 problem found before any model was loaded:",
                                               "  - input model: model path '/no/such/model' does not exist"]
    assert "Traceback" not in res.stdout + res.stderr and not (tmp_path / "error.json").exists()


def test_a_stage_process_reports_an_unexpected_error_with_its_traceback_file(monkeypatch, tmp_path, capsys):
    from stages import entry, registry

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setattr(registry, "runnable", lambda: {"base_model": broken})
    assert entry.main(["base_model", "--overrides", json.dumps({"tracking.uri": f"sqlite:///{tmp_path}/m.db"})]) == 1
    err = capsys.readouterr().err
    m = re.search(r"unexpected error: RuntimeError: disk on fire\nfull traceback: (\S+)", err)
    assert m and "Traceback" not in err, err
    assert "disk on fire" in Path(m.group(1)).read_text()
    assert "disk on fire" in json.loads((tmp_path / "error.json").read_text())["message"]["message"]


def test_the_launcher_shows_a_rank_s_one_line_error(tmp_path):
    """torchrun_failure: a rank that exited 2 with our message (no error.json, no traceback) is reported by it."""
    from flows.launch.supervise import torchrun_failure

    rank = tmp_path / "logs" / "run_1" / "attempt_0" / "0"
    rank.mkdir(parents=True)
    (rank / "stderr.log").write_text("12:00:01 INFO r1: ▶ r1_zero started\npreflight: 1 problem found before any "
                                     "model was loaded:\n - r1_zero.data.path: data set 'x' does not exist\n")
    text = torchrun_failure("r1_zero", 1, ["  rank      : 0 (local_rank: 0)", "  exitcode  : 2 (pid: 7)"], tmp_path / "logs")
    assert text.endswith("rank 0 error:\npreflight: 1 problem found before any model was loaded:\n - "
                         "r1_zero.data.path: data set 'x' does not exist"), text


def test_an_interrupt_swallowed_by_a_finaliser_is_raised_again():
    """Python prints an exception raised inside a weakref callback or `__del__` as "ignored" and goes on: the handler
    raises it again every second until it is caught (`handled`)."""
    import gc
    import weakref

    from stages.core.errors import Interrupted, handled, raise_on_signals

    class Box:
        pass

    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)]
    try:
        raise_on_signals()
        box = Box()
        weakref.finalize(box, lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.1)))  # raises in there
        t0 = time.monotonic()
        with pytest.raises(Interrupted, match=r"interrupted \(SIGINT\)"):
            del box
            gc.collect()
            while time.monotonic() - t0 < 5:  # the training loop going on
                time.sleep(0.05)
        assert time.monotonic() - t0 < 3
        handled()
        time.sleep(1.5)  # caught: not raised again
    finally:
        for s, h in zip((signal.SIGINT, signal.SIGTERM, signal.SIGALRM), before, strict=True):
            signal.signal(s, h)


def _ctrl_c(proc: subprocess.Popen, log: Path) -> tuple[float, list[str]]:
    """SIGINT to the process group (a terminal's Ctrl-C): (seconds until it ended, its lines after the signal)."""
    before = len(log.read_text())
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t0, log.read_text()[before:].strip().splitlines()


def _quiet_for(log: Path, seconds: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if log.stat().st_size != size:
            size, since = log.stat().st_size, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.5)


def test_ctrl_c_on_serve_with_the_server_up_and_gone_and_on_up(tmp_path):
    """`r1 serve` (started with SIGINT ignored, as a script's background job) stops on Ctrl-C with one line, with
    the Prefect server up (schedules paused) and after `r1 up` stopped it (schedules left active); `r1 up` too."""
    from tests.test_deployments import _free_port, _wait_for

    pport, mport = _free_port(), _free_port()
    env = {**_env(tmp_path), "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api"}
    up_log = tmp_path / "up.log"
    up = subprocess.Popen([*R1, "up", "--prefect-port", str(pport), "--mlflow-port", str(mport)], cwd=tmp_path,
                          env=env, stdout=up_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]
    try:
        _wait_for(up, up_log, "export PREFECT_API_URL", 300)
        for server in ("up", "gone"):
            log = tmp_path / f"serve-{server}.log"
            serve = subprocess.Popen([*ignoring_sigint, *R1, "serve", *_sets(MINI)], cwd=tmp_path, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
            _wait_for(serve, log, "r1-distill/tiny", 300)
            time.sleep(5)  # the names are printed just before Prefect's runner starts (a Ctrl-C before: nothing to pause)
            if server == "gone":
                seconds, lines = _ctrl_c(up, up_log)
                assert up.returncode == 0 and seconds < 10, (up.returncode, seconds, lines)
                assert lines == ["stopping the servers"]
                _quiet_for(log, 5)  # what Prefect's runner says when its server goes away comes before the Ctrl-C
            seconds, lines = _ctrl_c(serve, log)
            assert serve.returncode == 0 and seconds < 10, (serve.returncode, seconds, lines)
            assert len(lines) == 1, (server, log.read_text()[-3000:])
            if server == "up":
                assert lines[0].endswith("INFO flows.deployments: r1 serve stopped; the deployments' schedules are "
                                         "paused"), lines
            else:
                assert "WARNING flows.deployments: r1 serve stopped; schedules left active: the Prefect server did " \
                       "not answer within 5 s" in lines[0], lines
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
