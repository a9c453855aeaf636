"""Fault injection: a GRPO stage and the synthesis stage are SIGKILLed mid-run (R1_FAULT_KILL_AT) in their own
processes (what a launcher runs), an SFT stage inside a pipeline flow process; rerunning the flow resumes each from its
last checkpoint or shard and never reruns a finished stage, and the chain ends with the optimiser steps, dataset rows and
final weights of an uninterrupted run and no MLflow metric logged twice at one step. A Prefect retry (after an exception
at a step, R1_FAULT_RAISE_AT) resumes the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from tests.conftest import MINI

CHAIN = ["r1_zero", "synthesize", "general_sft"]


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    """A mini model pretrained just enough to stop before max_new_tokens now and then (synthesis keeps those)."""
    from stages.base_model import build_base_model
    from stages.core.recipe import load_recipe

    out = tmp_path_factory.mktemp("faults_model") / "model"
    build_base_model(load_recipe("tiny", {**MINI, "base_model.max_steps": 40, "base_model.learning_rate": 1e-2}), out,
                     progress=False)
    return str(out)


def overrides(root: Path) -> dict:
    return {**MINI, "tracking.uri": f"sqlite:///{root}/mlflow.db", "output_dir": str(root / "runs"),
            "r1_zero.grpo.prompts_per_step": 4, "r1_zero.grpo.num_generations": 2,
            "r1_zero.grpo.steps_per_iteration": 4, "r1_zero.grpo.checkpoint_every": 2, "r1_zero.grpo.log_every": 1,
            "r1_zero.grpo.max_completion_length": 12, "r1_zero.data.num_prompts": 16, "r1_zero.samples_to_log": 4,
            "synthesize.max_prompts": 24, "synthesize.samples_per_prompt": 2, "synthesize.batch_prompts": 4,
            "synthesize.require_correct": False, "synthesize.require_format": False,
            "synthesize.require_language": False, "synthesize.max_new_tokens": 32,
            "synthesize.max_completion_tokens": 32, "synthesize.reasoning_target": 6, "synthesize.general_target": 4,
            "synthesize.shard_size": 2, "synthesize.samples_to_log": 4,
            "general_sft.sft": {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 1,
                                "log_every": 1, "checkpoint_every": 2, "max_length": 96}}


def seed_upstream(uri: str, model_dir: str, stages=("base_model", "reasoning_rl")) -> None:
    """Finished runs of the stages upstream of CHAIN, each with `model_dir` as its model artifact."""
    from stages.core import tracking
    from stages.core.recipe import TrackingConfig

    for stage in stages:
        with tracking.stage_run(TrackingConfig(uri=uri, experiment="r1-tiny"), stage, {}, "tiny"):
            mlflow.log_artifacts(model_dir, artifact_path="model")


def runs_of(stage: str) -> list:
    exp = mlflow.get_experiment_by_name("r1-tiny")
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`r1.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"], output_format="list")


def history(run_id: str) -> dict[str, list]:
    client = mlflow.MlflowClient()
    return {k: client.get_metric_history(run_id, k) for k in client.get_run(run_id).data.metrics}


def assert_no_duplicate_steps(run_id: str) -> dict[str, list]:
    hist = history(run_id)
    for key, entries in hist.items():
        dup = [s for s, n in Counter(m.step for m in entries).items() if n > 1]
        assert not dup, f"run {run_id}: metric {key} logged twice at steps {dup}"
    return hist


def steps(hist: dict, key: str) -> list[int]:
    return sorted(m.step for m in hist[key])


def value_at(hist: dict, key: str, step: int) -> float:
    return next(m.value for m in hist[key] if m.step == step)


def child(args: list[str], env: dict) -> subprocess.Popen:
    """`python <args>` in another process (with this module's Prefect test server), fault env added."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def stage_in_child(stage: str, over: dict, inputs: dict, point: str) -> subprocess.Popen:
    """The stage's entry point, as launchers run it."""
    return child(["-m", "stages.entry", stage, "--recipe", "tiny", "--overrides", json.dumps(over),
                  "--inputs", json.dumps(inputs)], {"R1_FAULT_KILL_AT": point})


def pipeline_in_child(over: dict, point: str) -> subprocess.Popen:
    code = ("import json, sys; from flows.pipeline import r1_pipeline; "
            "r1_pipeline(recipe='tiny', stages=json.loads(sys.argv[1]), overrides=json.loads(sys.argv[2]))")
    return child(["-c", code, json.dumps(CHAIN), json.dumps(over)], {"R1_FAULT_KILL_AT": point})


def killed(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, f"{what}: exit {proc.returncode}\n{err[-3000:]}"


def final_weights(run) -> dict:
    from safetensors.torch import load_file

    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model"))
    return load_file(next(folder.glob("*.safetensors")))


def test_killed_stages_resume_when_the_pipeline_reruns(prefect_harness, mini_model, tmp_path):
    from flows.pipeline import r1_pipeline
    from stages.core.data import load_rows

    over, ref_over = overrides(tmp_path / "faulty"), overrides(tmp_path / "ref")
    seed_upstream(over["tracking.uri"], mini_model)
    upstream = {s: f"runs:/{runs_of(s)[0].info.run_id}/model" for s in ("base_model", "reasoning_rl")}
    # SIGKILL r1_zero after step 3 (its checkpoint is at 2) and synthesize after its first shard, each in its process
    first = [stage_in_child("r1_zero", over, {"model": upstream["base_model"]}, "r1_zero:3"),
             stage_in_child("synthesize", over, {"model": upstream["reasoning_rl"]}, "synthesize:1")]

    # meanwhile, the reference: the same chain uninterrupted, in another store
    seed_upstream(ref_over["tracking.uri"], mini_model)
    r1_pipeline(recipe="tiny", stages=CHAIN, overrides=ref_over)
    ref = {s: runs_of(s)[-1] for s in CHAIN}
    ref_hist = {s: assert_no_duplicate_steps(r.info.run_id) for s, r in ref.items()}  # uninterrupted: none either
    ref_weights = {s: final_weights(ref[s]) for s in ("r1_zero", "general_sft")}
    ref_rows = load_rows(mlflow.artifacts.download_artifacts(run_id=ref["synthesize"].info.run_id,
                                                             artifact_path="data"))
    killed(first[0], "r1_zero")
    killed(first[1], "synthesize")

    # the pipeline resumes both and runs general_sft; this flow process is SIGKILLed after general_sft's step 3
    killed(pipeline_in_child(over, "general_sft:3"), "pipeline at general_sft")
    out = r1_pipeline(recipe="tiny", stages=CHAIN, overrides=over)  # the rerun that finishes
    assert out["skipped"] == ["r1_zero", "synthesize"]  # finished stages are never rerun
    again = r1_pipeline(recipe="tiny", stages=CHAIN, overrides=over)
    assert again["skipped"] == CHAIN and again["stages"] == out["stages"]

    # each stage: the killed attempt (marked KILLED) and the one that resumed it; nothing else ran
    expected_steps = {"r1_zero": ("loss", range(1, 5), 2), "synthesize": ("synth/kept", range(1, 4), 1),
                      "general_sft": ("sft/loss", range(1, 7), 2)}
    for stage, (key, want, resumed_at) in expected_steps.items():
        dead, final = runs_of(stage)
        assert dead.info.status == "KILLED" and final.info.status == "FINISHED"
        assert dead.data.tags["r1.resumed_by"] == final.info.run_id == out["stages"][stage]["run_id"]
        assert final.data.tags["r1.resumed_from"] == dead.info.run_id
        hist, killed_hist = assert_no_duplicate_steps(final.info.run_id), history(dead.info.run_id)
        assert steps(hist, key) == list(want), stage
        assert steps(hist, key) == steps(ref_hist[stage], key)  # as many steps as the uninterrupted run
        # the killed GRPO/SFT attempts got one step past their checkpoint; synthesis died right after its shard
        assert max(steps(killed_hist, key)) == resumed_at + (stage != "synthesize")
        # resumed, not restarted: the steps up to the checkpoint are the killed attempt's (wall-clock times included)
        timing = {"r1_zero": "step_time", "synthesize": "synth/kept", "general_sft": "sft/step_seconds"}[stage]
        for s in range(1, resumed_at + 1):
            assert value_at(hist, timing, s) == value_at(killed_hist, timing, s)
        if stage != "synthesize":  # the recomputed step after the checkpoint equals the killed attempt's
            assert value_at(hist, key, resumed_at + 1) == pytest.approx(value_at(killed_hist, key, resumed_at + 1))

    # same optimiser steps, same dataset rows, same final weights as the uninterrupted run
    work = Path(over["output_dir"])
    r1_state = json.loads(max((work / "r1_zero").glob("*/checkpoints/checkpoint-*/trainer_state.json")).read_text())
    assert r1_state["global_step"] == 4
    for stage in ("r1_zero", "general_sft"):
        a, b = final_weights(runs_of(stage)[-1]), ref_weights[stage]
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
    rows = load_rows(mlflow.artifacts.download_artifacts(run_id=out["stages"]["synthesize"]["run_id"],
                                                         artifact_path="data"))
    assert len(rows) == len(ref_rows) == 10
    synth = runs_of("synthesize")[-1].data.metrics  # and generated no more samples than it
    assert synth["synth/generated"] == ref["synthesize"].data.metrics["synth/generated"]
    assert [r["completion"] for r in rows] == [r["completion"] for r in ref_rows]


def test_a_prefect_retry_resumes_from_the_checkpoint(prefect_harness, mini_model, tmp_path, monkeypatch):
    """An exception at step 3 (after checkpoint 2) fails the stage task; Prefect's retry resumes at step 2."""
    from flows import pipeline

    monkeypatch.setattr(pipeline, "run_stage", pipeline.run_stage.with_options(retry_delay_seconds=0))
    monkeypatch.setenv("R1_FAULT_RAISE_AT", "r1_zero:3")
    monkeypatch.setenv("R1_FAULT_ONCE_DIR", str(tmp_path / "faults"))
    over = overrides(tmp_path)
    seed_upstream(over["tracking.uri"], mini_model, stages=("base_model",))
    out = pipeline.r1_pipeline(recipe="tiny", stages=["r1_zero"], overrides=over)
    failed, final = runs_of("r1_zero")
    assert failed.info.status == "FAILED" and final.info.status == "FINISHED"
    assert final.info.run_id == out["stages"]["r1_zero"]["run_id"] == failed.data.tags["r1.resumed_by"]
    hist, failed_hist = assert_no_duplicate_steps(final.info.run_id), history(failed.info.run_id)
    assert steps(hist, "loss") == [1, 2, 3, 4] and steps(failed_hist, "loss") == [1, 2, 3]
    assert [value_at(hist, "step_time", s) for s in (1, 2)] == [value_at(failed_hist, "step_time", s) for s in (1, 2)]
    assert (tmp_path / "faults" / "r1_zero-3-rank0").exists()
