"""Prefect and the cluster, against the session's local Prefect server: stage launches inside flows take a slot of the
cluster's concurrency limit (two GPU stages never share the nodes), and a flow run whose process was SIGKILLed is
marked Crashed by the heartbeat automation `r1 serve` creates."""

from __future__ import annotations

import os
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


def test_serve_sets_up_heartbeats_the_crash_automation_and_the_cluster_limit(prefect_harness, monkeypatch):
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from flows.deployments import CRASH_AUTOMATION, build_deployments, prepare_server

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
        prepare_server(build_deployments(cfg, "tiny", overrides))  # again: nothing duplicated
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(CRASH_AUTOMATION)) == 1
    finally:
        Automation.read(name=CRASH_AUTOMATION).delete()
