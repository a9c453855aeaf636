"""Single-stage flows, deployments with schedules (`r1 serve`), and the local servers (`r1 up`)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from stages.core.recipe import RecipeError, load_recipe
from tests.conftest import MINI
from tests.test_flows import SMALL_RL, _stage_runs

R1 = str(Path(sys.executable).parent / "r1")


def test_stage_flows_take_pydantic_forms_with_one_field_per_input():
    from prefect.utilities.callables import parameter_schema
    from pydantic import ValidationError

    from flows.stage_flows import STAGE_FLOWS, StageRequest
    from stages.core.order import INPUTS, ORDER

    assert list(STAGE_FLOWS) == ORDER
    for stage, fl in STAGE_FLOWS.items():
        schema = parameter_schema(fl).model_dump()
        assert set(schema["properties"]) == {"request", "inputs"}
        inputs = schema["definitions"][schema["properties"]["inputs"]["$ref"].rsplit("/", 1)[1]]
        assert set(inputs["properties"]) == set(INPUTS[stage])
        assert all("newest finished" in f["description"] for f in inputs["properties"].values())
    assert STAGE_FLOWS["r1_zero"].name == "r1-zero" and STAGE_FLOWS["cold_start_sft"].name == "r1-cold-start-sft"
    with pytest.raises(ValidationError, match="recipie"):
        StageRequest(recipie="tiny")


def test_schedules_carry_complete_parameters_and_bad_ones_are_refused():
    from flows.deployments import build_deployments, schedules_for

    cfg = load_recipe("tiny", {"schedules": [
        {"flow": "reasoning_rl", "cron": "0 2 * * *", "force": True, "overrides": {"seed": 3}},
        {"flow": "pipeline", "cron": "30 4 * * 0", "timezone": "Europe/Paris"}]})
    (nightly,) = schedules_for(cfg, "reasoning_rl", "tiny", {"eval.num_prompts": 8})
    assert nightly.cron == "0 2 * * *" and nightly.active
    assert nightly.parameters == {"request": {"recipe": "tiny", "overrides": {"eval.num_prompts": 8, "seed": 3},
                                              "force": True}}
    (weekly,) = schedules_for(cfg, "pipeline", "tiny", {})
    assert weekly.timezone == "Europe/Paris" and weekly.parameters == {"recipe": "tiny", "overrides": {},
                                                                       "force": None}
    deployments = {d.flow_name: d for d in build_deployments(cfg, "tiny")}
    assert len(deployments) == 9 and all(d.name == "tiny" for d in deployments.values())
    assert len(deployments["r1-reasoning-rl"].schedules) == 1 and not deployments["r1-synthesize"].schedules
    assert deployments["r1-reasoning-rl"].entrypoint == "flows/stage_flows.py:reasoning_rl"
    # the preset's own schedule is registered paused
    assert [s.active for s in schedules_for(load_recipe("tiny"), "reasoning_rl", "tiny", {})] == [False]

    with pytest.raises(RecipeError, match=r"schedules\.0\.flow|unknown flow 'reasoning'"):
        load_recipe("tiny", {"schedules": [{"flow": "reasoning", "cron": "0 2 * * *"}]})
    with pytest.raises(RecipeError, match="must have 5 fields"):
        load_recipe("tiny", {"schedules": [{"flow": "pipeline", "cron": "nightly"}]})
    with pytest.raises(RecipeError, match=r"schedules\.0: cron '61 \* \* \* \*' is not a valid cron expression"):
        load_recipe("tiny", {"schedules": [{"flow": "pipeline", "cron": "61 * * * *"}]})
    with pytest.raises(RecipeError, match=r"schedules\.0\.timezone: unknown time zone 'Mars/Olympus'"):
        load_recipe("tiny", {"schedules": [{"flow": "pipeline", "cron": "0 1 * * *", "timezone": "Mars/Olympus"}]})


def test_serve_without_a_server_says_how_to_start_one(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even inside another test's Prefect harness
        out = CliRunner().invoke(app, ["serve"])
    assert out.exit_code == 2 and "r1 up" in out.output and "PREFECT_API_URL" in out.output
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{_free_port()}/api"}):
        out = CliRunner().invoke(app, ["serve"])
    assert out.exit_code == 2 and "does not answer" in out.output


def test_local_servers_bind_to_loopback_and_skip_mlflow_for_a_tracking_server():
    from flows.servers import local_servers

    prefect, ui = local_servers("sqlite:///mlflow.db")
    for s in (prefect, ui):
        assert s.command[s.command.index("--host") + 1] == "127.0.0.1" and s.url.startswith("http://127.0.0.1:")
    assert ui.command[ui.command.index("--backend-store-uri") + 1] == "sqlite:///mlflow.db"
    assert [s.name for s in local_servers("http://mlflow.internal:5000")] == ["Prefect server"]
    assert ui.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no GenAI job runners beside the UI


def test_r1_up_stops_on_sigint_even_when_started_with_sigint_ignored():
    """A background job of a non-interactive shell starts with SIGINT ignored; `r1 up` must still stop on it."""
    from stages.core.errors import handled, raise_on_signals

    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)]
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise_on_signals()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs at the next bytecode boundary
            handled()
    finally:
        for s, h in zip((signal.SIGINT, signal.SIGTERM, signal.SIGALRM), before, strict=True):
            signal.signal(s, h)


def test_stage_flow_resolves_upstream_and_takes_run_ids_and_aliases(prefect_harness, tmp_path):
    from flows.stage_flows import STAGE_FLOWS, StageRequest

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    request = StageRequest(overrides={**MINI, **SMALL_RL, "tracking.uri": uri, "output_dir": str(tmp_path / "runs")})
    base = STAGE_FLOWS["base_model"](request=request)["stages"]["base_model"]
    rl = STAGE_FLOWS["r1_zero"](request=request)  # no input: the newest finished base_model run
    run = mlflow.get_run(rl["stages"]["r1_zero"]["run_id"])
    assert run.data.tags["r1.input.model"] == base["model"] and rl["skipped"] == []
    # the rerun's parent MLflow run is named after the stage, and the stage run is nested under it
    assert mlflow.get_run(rl["pipeline_run_id"]).info.run_name == "r1_zero-tiny"
    assert run.data.tags["mlflow.parentRunId"] == rl["pipeline_run_id"]

    # a bare run id and a registered-model alias name the same model: unchanged, so the finished run is reused
    for given in (base["run_id"], "models:/r1-tiny-base_model@current"):
        again = STAGE_FLOWS["r1_zero"](request=request, inputs={"model": given})
        assert again["skipped"] == ["r1_zero"] and again["stages"] == rl["stages"]
    forced = STAGE_FLOWS["r1_zero"](request=request.model_copy(update={"force": True}))
    assert forced["skipped"] == [] and len([r for r in _stage_runs(uri) if r.data.tags["r1.stage"] == "r1_zero"]) == 2

    from stages.core.lineage import StageInputError

    with pytest.raises(StageInputError, match="no such registered model version"):
        STAGE_FLOWS["r1_zero"](request=request, inputs={"model": "models:/r1-tiny-base_model@nightly"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_up_then_serve_then_a_deployment_triggered_through_the_api_completes(tmp_path):
    """What a user does: `r1 up`, `r1 serve`, then the UI's Run button (the API call `run_deployment` makes)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    pport, mport = _free_port(), _free_port()
    api = f"http://127.0.0.1:{pport}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    sets = [x for k, v in MINI.items() for x in ("--set", f"{k}={v}")]
    up_log, serve_log = tmp_path / "up.log", tmp_path / "serve.log"
    up = subprocess.Popen([R1, "up", "--prefect-port", str(pport), "--mlflow-port", str(mport)], cwd=tmp_path,
                          env=env, stdout=up_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        _wait_for(up, up_log, "export PREFECT_API_URL", 240)
        import httpx

        assert httpx.get(f"http://127.0.0.1:{mport}/health").status_code == 200
        serve = subprocess.Popen([R1, "serve", *sets], cwd=tmp_path, env={**env, "PREFECT_API_URL": api},
                                 stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(serve, serve_log, "r1-distill/tiny", 180)

        with temporary_settings({PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect/storage"}):
            fr = run_deployment("r1-base-model/tiny", timeout=300)
            assert fr.state.is_completed(), fr.state
            result = fr.state.result()

            async def deployment(name):
                async with get_client() as client:
                    return await client.read_deployment_by_name(name)

            nightly = anyio.run(deployment, "r1-reasoning-rl/tiny")
        (schedule,) = nightly.schedules
        assert schedule.schedule.cron == "0 2 * * *" and schedule.active is False
        assert schedule.parameters["request"]["force"] is True
        assert nightly.parameters["request"]["overrides"]["base_model.max_steps"] == MINI["base_model.max_steps"]

        run_id = result["stages"]["base_model"]["run_id"]
        (stage_run,) = _stage_runs(f"sqlite:///{tmp_path}/mlflow.db")
        assert stage_run.info.run_id == run_id and stage_run.info.status == "FINISHED"
    finally:
        for proc in (serve, up):
            if proc is not None:
                _stop(proc)
    # Ctrl-C on `r1 up` stops both servers: nothing listens on their ports any more
    for port in (pport, mport):
        with socket.socket() as s, pytest.raises(OSError):
            s.connect(("127.0.0.1", port))
