"""`r1 up`: a local Prefect server (UI + API + scheduler) and the MLflow UI over the recipe's store, on 127.0.0.1.

Both run as child processes of `r1 up`, logging into `<log_dir>/`; Ctrl-C (or SIGTERM) stops both. For a team,
`infra/compose.yaml` runs the same two servers with PostgreSQL and an S3-compatible artifact store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServerError(RuntimeError):
    """A server that could not start or stopped answering."""


@dataclass
class Server:
    name: str
    command: list[str]
    url: str  # what a user opens
    health: str  # answers 200 once the server is ready
    env: dict[str, str]

    @property
    def log_name(self) -> str:
        return self.name.lower().replace(" ", "-") + ".log"


def _tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServerError(f"`{name}` is not installed in this environment ({sys.executable})")
    return found


def local_servers(tracking_uri: str, host: str = "127.0.0.1", prefect_port: int = 4200,
                  mlflow_port: int = 5000, artifacts: str = "./mlartifacts") -> list[Server]:
    """The Prefect server, and an MLflow server over `tracking_uri` unless that is already a server (http...)."""
    prefect = Server(
        "Prefect server", [_tool("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        f"http://{host}:{prefect_port}", f"http://{host}:{prefect_port}/api/health",
        {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api"})
    servers = [prefect]
    if not tracking_uri.startswith(("http://", "https://")):
        servers.append(Server(
            "MLflow UI", [_tool("mlflow"), "server", "--backend-store-uri", tracking_uri, "--host", host,
                          "--port", str(mlflow_port), "--workers", "1", "--artifacts-destination", artifacts],
            f"http://{host}:{mlflow_port}", f"http://{host}:{mlflow_port}/health",
            # MLflow 3's server otherwise starts seven job-runner processes (~250 MB each) for GenAI jobs the UI of
            # a training run never uses, and they slow its shutdown
            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
    return servers


def start(servers: list[Server], log_dir: Path) -> list[subprocess.Popen]:
    """Start every server in its own process group (so stopping takes its workers too), logs in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for s in servers:
        log = open(log_dir / s.log_name, "ab")  # noqa: SIM115 -- the child keeps writing after this returns
        procs.append(subprocess.Popen(s.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **s.env},
                                      start_new_session=True))
    return procs


def wait_ready(servers: list[Server], procs: list[subprocess.Popen], log_dir: Path, timeout: float = 180) -> None:
    """Poll each health URL until it answers; a server that exits first fails with the tail of its log."""
    deadline = time.monotonic() + timeout
    for s, p in zip(servers, procs, strict=True):
        while True:
            if p.poll() is not None:
                tail = (log_dir / s.log_name).read_text(errors="replace")[-3000:]
                raise ServerError(f"{s.name} exited with code {p.returncode} before it was ready "
                                  f"({' '.join(s.command)}):\n{tail}")
            try:
                if httpx.get(s.health, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"{s.name} did not answer at {s.health} within {timeout:.0f} s; see "
                                  f"{log_dir / s.log_name}")
            time.sleep(0.5)


def stop(procs: list[subprocess.Popen], grace: float = 8) -> None:
    """SIGTERM each server's process group, then SIGKILL what is left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already ended
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # already ended
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def watch(servers: list[Server], procs: list[subprocess.Popen]) -> str:
    """Block until a server exits (returns its name) or this process is interrupted
    (`stages.core.errors.raise_on_signals`)."""
    while True:
        for s, p in zip(servers, procs, strict=True):
            if p.poll() is not None:
                return s.name
        time.sleep(1)
