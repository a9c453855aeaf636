"""Prefect and the cluster, against the session's local Prefect server: stage launches inside flows take a slot of the
cluster's concurrency limit (two GPU stages never share the nodes), a flow run whose process was SIGKILLed is
marked Crashed by the heartbeat automation `r1 serve` creates, and a crashed run of a served deployment is run again,
with its parameters, at most `cluster.crash_retries` times."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from stages.core.recipe import load_recipe


def test_cluster_limit_name_and_slots():
    from flows.launch.cluster import limit_name, slots

    gpu = load_recipe("tiny", {"cluster.gpus_per_node": 8, "cluster.launcher": "slurm", "cluster.partition": "h200"})
    assert (limit_name(gpu.cluster), slots(gpu.cluster)) == ("r1-cluster-h200", 1)
    named = load_recipe("tiny", {"cluster.gpus_per_node": 8, "cluster.name": "lab", "cluster.concurrency": 2})
    assert (limit_name(named.cluster), slots(named.cluster)) == ("r1-cluster-lab", 2)
    cpu = load_recipe("tiny")
    assert (limit_name(cpu.cluster), slots(cpu.cluster)) == ("r1-cluster-local", None)  # CPU: no limit
    assert slots(load_recipe("tiny", {"cluster.launcher": "kubernetes", "cluster.gpus_per_node": 8}).cluster) is None
    with pytest.raises(Exception, match=r"cluster\.name"):
        load_recipe("tiny", {"cluster.name": "a b"})


def _two_overlapping_stage_flows(monkeypatch, concurrency: int, name: str) -> list[tuple[str, float, float]]:
    """Two flows launch a stage each at the same moment on a cluster with `concurrency` slots; a launch lasts until
    the other one has started, or 6 s (flows start a second or more apart here). Returns (stage, start, end) of each."""
    from prefect import flow

    from flows.launch import stage as launch_module
    from flows.launch.spec import LaunchSpec

    spans: list[tuple[str, float, float]] = []

    started = {s: threading.Event() for s in ("r1_zero", "reasoning_rl")}

    def fake_launch(stage, *args, **kwargs) -> dict:  # what runs while the slot is held
        t0 = time.monotonic()
        started[stage].set()
        (other,) = set(started) - {stage}
        started[other].wait(timeout=6)
        spans.append((stage, t0, time.monotonic()))
        return {"run_id": stage}

    monkeypatch.setattr(launch_module, "_launch", fake_launch)
    overrides = {"cluster.gpus_per_node": 1, "cluster.name": name, "cluster.concurrency": concurrency}

    @flow(name="r1-test-stage")
    def stage_flow(stage: str) -> dict:
        return launch_module.launch_stage(stage, "tiny", overrides, spec=LaunchSpec(), log=print)

    threads = [threading.Thread(target=stage_flow, args=(s,)) for s in ("r1_zero", "reasoning_rl")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(spans) == 2, spans
    return sorted(spans, key=lambda s: s[1])


def test_two_stage_flows_on_one_cluster_run_one_after_the_other(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client

    (_, _, first_end), (_, second_start, _) = _two_overlapping_stage_flows(monkeypatch, 1, "serial")
    assert second_start >= first_end  # the second waited for the first's slot
    with get_client(sync_client=True) as client:  # created on first use, with the recipe's slots, and all free again
        limit = client.read_global_concurrency_limit_by_name("r1-cluster-serial")
    assert limit.limit == 1 and limit.active_slots == 0


def test_two_slots_let_two_stage_flows_overlap(prefect_harness, monkeypatch):
    (_, _, first_end), (_, second_start, _) = _two_overlapping_stage_flows(monkeypatch, 2, "pair")
    assert second_start < first_end


CRASHING_FLOW = """
import time
from prefect import flow

@flow(name="r1-test-crash")
def long_stage():
    print("running", flush=True)
    time.sleep(600)

long_stage()
"""


def test_a_killed_flow_run_is_marked_crashed_instead_of_running_forever(prefect_harness, tmp_path):
    """The automation `r1 serve` creates, with a short window: SIGKILL the process of a running flow, and the run
    (Running, its heartbeats stopped) becomes Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import crash_automation

    automation = crash_automation(within_seconds=10).create()  # on this test's server only: 10 s would crash live runs
    try:
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        proc = subprocess.Popen([sys.executable, "-c", CRASHING_FLOW], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "running"  # the flow run is Running, its first heartbeat sent
        time.sleep(2)
        proc.kill()
        proc.wait()
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 180
            while True:
                (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["r1-test-crash"])),
                                               sort=FlowRunSort.START_TIME_DESC, limit=5)
                if run.state.is_crashed() or time.monotonic() > deadline:
                    break
                assert run.state.is_running(), run.state
                time.sleep(2)
        assert run.state.is_crashed() and "no heartbeat for 10 s" in (run.state.message or "")
    finally:
        automation.delete()


SERVED_FLOW = """
import os, sys, time
from prefect import flow
from prefect.runtime import flow_run

@flow(name="r1-test-retry")
def attempt(log: str):
    with open(log, "a") as f:
        f.write(f"{flow_run.run_count} {os.getpid()}\\n")
    time.sleep(600)

if __name__ == "__main__":  # the runner imports this file to run each attempt
    attempt.serve(name="crashes", tags=["r1", "recipe:retrytest"], parameters={"log": sys.argv[1]})
"""


def test_a_crashed_run_of_a_served_deployment_is_retried_up_to_the_cap(prefect_harness, tmp_path):
    """A deployment served as `r1 serve` serves (a runner in its own process, the recipe's tags), the retry automation
    with 2 retries: SIGKILL each attempt's process. The runner marks the run Crashed, the automation reschedules it,
    the runner runs it again with the same parameters: attempts 1, 2, 3; the third crash stays Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import RETRY_AUTOMATION, ensure_retry_automation

    ensure_retry_automation("retrytest", 2)
    log = tmp_path / "attempts.txt"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PYTHONUNBUFFERED": "1"}
    script, output = tmp_path / "served_flow.py", tmp_path / "serve.log"
    script.write_text(SERVED_FLOW)  # the runner starts each attempt from the flow's file
    server = subprocess.Popen([sys.executable, str(script), str(log)], env=env, cwd=tmp_path,
                              stdout=output.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def attempts() -> list[tuple[int, int]]:
        return [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []

    def wait_for(what, timeout=60):
        deadline = time.monotonic() + timeout
        while not (value := what()):
            assert time.monotonic() < deadline and server.poll() is None, (attempts(), output.read_text()[-3000:])
            time.sleep(0.5)
        return value

    try:
        with get_client(sync_client=True) as client:
            def deployment():
                try:
                    return client.read_deployment_by_name("r1-test-retry/crashes")
                except ObjectNotFound:
                    return None

            wait_for(deployment)  # the runner registered it
            run = run_deployment("r1-test-retry/crashes", timeout=0)
            for i in (1, 2, 3):
                count, pid = wait_for(lambda i=i: len(attempts()) >= i and attempts()[i - 1])
                assert count == i  # the same flow run, its i-th attempt
                os.kill(pid, signal.SIGKILL)
            final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_crashed() and r.run_count == 3 and r)
            time.sleep(8)  # time for a fourth attempt, were the cap not kept
            assert client.read_flow_run(run.id).state.is_crashed() and len(attempts()) == 3
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.deployment_id])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=10)
            assert [r.id for r in runs] == [run.id]  # rescheduled, not a new run: the same parameters
            assert final.parameters == {"log": str(log)}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # the runner and an attempt still running, were the test to fail
        server.wait()
        with get_client(sync_client=True) as client:
            for a in client.read_automations_by_name(RETRY_AUTOMATION.format("retrytest")):
                client.delete_automation(a.id)
            with contextlib.suppress(ObjectNotFound):
                client.delete_deployment(client.read_deployment_by_name("r1-test-retry/crashes").id)


def test_serve_sets_up_heartbeats_the_crash_automation_and_the_cluster_limit(prefect_harness, monkeypatch):
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    from flows.deployments import CRASH_AUTOMATION, RETRY_AUTOMATION, build_deployments, prepare_server

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)  # restored (unset) afterwards
    cfg = load_recipe("tiny", {"cluster.gpus_per_node": 4, "cluster.name": "served", "cluster.concurrency": 3})
    overrides = {"cluster.gpus_per_node": 4, "cluster.name": "served", "cluster.concurrency": 3}
    prepare_server(build_deployments(cfg, "tiny", overrides))
    try:
        assert os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "180"  # inherited by the flow runs it starts
        automation = Automation.read(name=CRASH_AUTOMATION)
        assert automation.trigger.within.total_seconds() == 540 and automation.trigger.posture == "Proactive"
        assert [a.type for a in automation.actions] == ["change-flow-run-state"]
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("r1-cluster-served").limit == 3
        retry = Automation.read(name=RETRY_AUTOMATION.format("tiny"))  # the served recipe's crashed runs, 2 reruns
        assert retry.trigger.match.root["prefect.run-count"] == ["1", "2"]
        assert retry.trigger.match_related[0].root["prefect.resource.id"] == "prefect.tag.recipe:tiny"
        assert [(a.type, a.state) for a in retry.actions] == [("change-flow-run-state", StateType.SCHEDULED)]
        overrides["cluster.crash_retries"] = 5
        prepare_server(build_deployments(cfg, "tiny", overrides))  # again: nothing duplicated, the new cap
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(CRASH_AUTOMATION)) == 1
            (retry,) = client.read_automations_by_name(RETRY_AUTOMATION.format("tiny"))
            assert retry.trigger.match.root["prefect.run-count"] == [str(i) for i in range(1, 6)]
            overrides["cluster.crash_retries"] = 0
            prepare_server(build_deployments(cfg, "tiny", overrides))  # no retries: no automation
            assert client.read_automations_by_name(RETRY_AUTOMATION.format("tiny")) == []
    finally:
        Automation.read(name=CRASH_AUTOMATION).delete()
        with get_client(sync_client=True) as client:
            for a in client.read_automations_by_name(RETRY_AUTOMATION.format("tiny")):
                client.delete_automation(a.id)
