"""The two UIs in a browser: `r1 up`, `r1 serve`, a short pipeline run triggered like the UI's Run button, then the
Prefect deployments page and the MLflow runs page rendered by headless Chromium (DOM checked, screenshots taken).

`R1_SCREENSHOTS=docs/img pytest -m slow tests/test_browser.py` also writes the two screenshots README shows."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MINI
from tests.test_deployments import R1, _free_port, _stop, _wait_for
from tests.test_flows import SMALL_RL

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)
DEPLOYMENTS = ("r1-pipeline", "r1-base-model", "r1-zero", "r1-cold-start-sft", "r1-reasoning-rl", "r1-synthesize",
               "r1-general-sft", "r1-preference-rl", "r1-distill")
STAGES = ["base_model", "r1_zero"]
WINDOW = "1280,720"  # small enough for README, wide enough that neither UI collapses its tables

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                                          ".ci/run installs it when it can)")]


def chromium(url: str, profile: Path, *args: str) -> str:
    """Headless Chromium on `url` after the page's scripts had 15 s of virtual time; its stdout (the DOM for
    --dump-dom). Own profile folder: parallel runs would otherwise share (and lock) the default one."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--window-size={WINDOW}", "--virtual-time-budget=15000", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-2000:]}"
    return res.stdout


def page(url: str, png: Path, profile: Path) -> str:
    """The rendered DOM of `url`, and its screenshot in `png`."""
    dom = chromium(url, profile, "--dump-dom")
    chromium(url, profile, f"--screenshot={png}")
    assert png.stat().st_size > 10_000, f"{png} looks blank"
    return dom


def publish(png: Path) -> None:
    """With R1_SCREENSHOTS set, a copy of `png` there, reduced to a 128-colour palette (README's images stay small)."""
    folder = os.environ.get("R1_SCREENSHOTS")
    if folder:
        from PIL import Image

        Path(folder).mkdir(parents=True, exist_ok=True)
        with Image.open(png) as img:
            img.convert("RGB").quantize(128, Image.Quantize.FASTOCTREE).save(Path(folder) / png.name, optimize=True)


def test_the_uis_show_the_nine_deployments_and_the_stage_runs(tmp_path):
    import mlflow
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    pport, mport = _free_port(), _free_port()
    api = f"http://127.0.0.1:{pport}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    sets = [x for k, v in {**MINI, **SMALL_RL}.items() for x in ("--set", f"{k}={v}")]
    up_log, serve_log = tmp_path / "up.log", tmp_path / "serve.log"
    up = subprocess.Popen([R1, "up", "--prefect-port", str(pport), "--mlflow-port", str(mport)], cwd=tmp_path,
                          env=env, stdout=up_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        _wait_for(up, up_log, "export PREFECT_API_URL", 240)
        serve = subprocess.Popen([R1, "serve", *sets], cwd=tmp_path, env={**env, "PREFECT_API_URL": api},
                                 stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(serve, serve_log, "r1-distill/tiny", 180)
        with temporary_settings({PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect/storage"}):
            fr = run_deployment("r1-pipeline/tiny", parameters={"stages": STAGES}, timeout=600)
        assert fr.state.is_completed(), fr.state

        profile = tmp_path / "chromium"
        dom = page(f"http://127.0.0.1:{pport}/deployments", tmp_path / "prefect-deployments.png", profile)
        missing = [d for d in DEPLOYMENTS if d not in dom]
        assert not missing and "tiny" in dom, f"Prefect's deployments page lacks {missing}:\n{dom[-3000:]}"

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        exp = mlflow.get_experiment_by_name("r1-tiny")
        # sorted by name: MLflow nests child runs (collapsed) under their parent only when sorted by date
        runs = f"http://127.0.0.1:{mport}/#/experiments/{exp.experiment_id}/runs?orderByKey=tags.%60mlflow.runName%60"
        dom = page(f"{runs}&orderByAsc=true", tmp_path / "mlflow-runs.png", profile)
        missing = [name for name in ("pipeline-tiny", *STAGES) if name not in dom]
        assert not missing, f"MLflow's runs page lacks {missing}:\n{dom[-3000:]}"
    finally:
        for proc in (serve, up):
            if proc is not None:
                _stop(proc)
    for png in ("prefect-deployments.png", "mlflow-runs.png"):
        publish(tmp_path / png)
