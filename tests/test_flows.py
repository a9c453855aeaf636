"""The pipeline flow: no repeated work, downstream-only reruns, input resolution before anything starts."""

import json
from pathlib import Path

import mlflow
import pytest

from stages.core.lineage import StageInputError
from tests.conftest import MINI

# r1_zero small enough for seconds
SMALL_RL = {
    "r1_zero.grpo.prompts_per_step": 4, "r1_zero.grpo.num_generations": 2, "r1_zero.grpo.steps_per_iteration": 2,
    "r1_zero.grpo.max_completion_length": 12, "r1_zero.data.num_prompts": 16, "r1_zero.samples_to_log": 4,
}


def _stage_runs(uri, experiment="r1-tiny"):
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    return [r for r in runs if r.data.tags.get("r1.stage") not in (None, "pipeline")]


def test_unchanged_stages_are_skipped_and_changes_rerun_downstream_only(prefect_harness, tmp_path):
    from flows.pipeline import r1_pipeline

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = {**MINI, **SMALL_RL, "tracking.uri": uri, "output_dir": str(tmp_path / "runs")}
    stages = ["base_model", "r1_zero"]

    first = r1_pipeline(recipe="tiny", stages=stages, overrides=base)
    assert first["skipped"] == [] and len(_stage_runs(uri)) == 2
    assert first["stages"]["r1_zero"]["model"].startswith("runs:/")
    # each stage's model is registered, and the alias resolves to a loadable model
    from stages.core.models import check_model_dir, resolve_model_uri

    check_model_dir(resolve_model_uri("models:/r1-tiny-r1_zero@current"), need_chat_template=True)
    # the pipeline's summary names every stage with its evaluation; compare sees both runs
    summary = mlflow.artifacts.load_text(f"runs:/{first['pipeline_run_id']}/summary.md")
    assert "| base_model |" in summary and "| r1_zero |" in summary and "pass_at_1" in summary
    from flows.compare import compare_rows
    from stages.core.recipe import load_recipe

    rows = compare_rows(load_recipe("tiny", base), pipeline_run_id=first["pipeline_run_id"])
    assert sorted(r["stage"] for r in rows) == stages and all(0 <= r["eval/pass_at_1"] <= 1 for r in rows)

    again = r1_pipeline(recipe="tiny", stages=stages, overrides=base)
    assert again["skipped"] == stages and len(_stage_runs(uri)) == 2
    assert again["stages"] == first["stages"]

    changed = r1_pipeline(recipe="tiny", stages=stages, overrides={**base, "r1_zero.grpo.learning_rate": 5e-4})
    assert changed["skipped"] == ["base_model"] and len(_stage_runs(uri)) == 3
    versions = mlflow.MlflowClient().search_model_versions("name = 'r1-tiny-r1_zero'")
    current = mlflow.MlflowClient().get_model_version_by_alias("r1-tiny-r1_zero", "current")
    assert len(versions) == 2 and current.run_id == changed["stages"]["r1_zero"]["run_id"]
    assert changed["stages"]["base_model"] == first["stages"]["base_model"]
    assert changed["stages"]["r1_zero"]["run_id"] != first["stages"]["r1_zero"]["run_id"]

    forced = r1_pipeline(recipe="tiny", stages=["r1_zero"], overrides=base, force=["r1_zero"])
    assert forced["skipped"] == [] and len(_stage_runs(uri)) == 4
    # the sub-chain's upstream was resolved in MLflow: the newest finished base_model run
    new_run = mlflow.get_run(forced["stages"]["r1_zero"]["run_id"])
    assert new_run.data.tags["r1.input.model"] == first["stages"]["base_model"]["model"]


def test_sub_chain_without_resolvable_upstream_fails_before_any_stage(prefect_harness, tmp_path):
    from flows.pipeline import r1_pipeline

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(StageInputError, match="no finished base_model run"):
        r1_pipeline(recipe="tiny", stages=["r1_zero"], overrides={**MINI, "tracking.uri": uri})
    exp = mlflow.get_experiment_by_name("r1-tiny")
    assert exp is None or not _stage_runs(uri)


def test_cli_stage_resolves_upstream_and_reports_missing_input(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [x for k, v in {**MINI, **SMALL_RL, "tracking.uri": uri, "output_dir": str(tmp_path / "runs")}.items()
            for x in ("--set", f"{k}={v}")]
    runner = CliRunner()
    missing = runner.invoke(app, ["stage", "r1_zero", *sets])
    assert missing.exit_code == 2 and "no finished base_model run" in missing.output
    assert runner.invoke(app, ["stage", "base_model", *sets]).exit_code == 0
    ok = runner.invoke(app, ["stage", "r1_zero", *sets])
    assert ok.exit_code == 0, ok.output
    (base_run,) = [r for r in _stage_runs(uri) if r.data.tags["r1.stage"] == "base_model"]
    (rl_run,) = [r for r in _stage_runs(uri) if r.data.tags["r1.stage"] == "r1_zero"]
    assert rl_run.data.tags["r1.input.model"] == f"runs:/{base_run.info.run_id}/model"
    assert runner.invoke(app, ["stage", "r2_zero"]).exit_code == 2


def test_cli_stage_launches_through_the_recipes_cluster_launcher(monkeypatch, tmp_path):
    """`r1 stage` starts a stage the way the pipeline's stage task does: with `cluster.launcher: torchrun`, torchrun
    over the recipe's processes, running the stage's entry point with the given input and the --set overrides."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.launch import stage as launch_module

    commands = []

    def fake_stream(cmd, spec, log, **kw):  # the torchrun run: rank 0's result file, nothing started
        commands.append(cmd)
        Path(cmd[cmd.index("--result-file") + 1]).write_text(json.dumps({"run_id": "launched"}))
        return 0, []

    monkeypatch.setattr(launch_module, "stream", fake_stream)
    sets = ["--set", "cluster.launcher=torchrun", "--set", "cluster.nproc_per_node=2", "--set",
            f"output_dir={tmp_path}", "--set", "seed=3"]
    out = CliRunner().invoke(app, ["stage", "r1_zero", "--input-model", "/models/base", *sets])
    assert out.exit_code == 0, out.output
    assert '"run_id": "launched"' in out.output
    (cmd,) = commands
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("stages.entry") - 1 : cmd.index("stages.entry") + 2] == ["-m", "stages.entry", "r1_zero"]
    assert json.loads(cmd[cmd.index("--inputs") + 1]) == {"model": "/models/base"}
    assert json.loads(cmd[cmd.index("--overrides") + 1])["seed"] == 3


def test_a_failing_rank_fails_the_stage_task_with_its_message(prefect_harness, monkeypatch, tmp_path):
    """The pipeline's stage task launching 2 torchrun ranks (the launcher-test stand-ins), of which rank 1 raises: the
    task run ends Failed, and its error is rank 1's."""
    from prefect import flow

    from flows import pipeline
    from flows.launch import LaunchSpec
    from stages.core.recipe import load_recipe
    from tests.launch_targets import FAIL_MESSAGE

    recipe = load_recipe("tiny", {"output_dir": str(tmp_path), "cluster.launcher": "torchrun",
                                  "cluster.nproc_per_node": 2, "cluster.timeout": 120,
                                  "cluster.env": {"OMP_NUM_THREADS": "1"}})
    real = LaunchSpec.from_cluster
    monkeypatch.setattr(LaunchSpec, "from_cluster",
                        classmethod(lambda cls, cluster, **kw: real(cluster, module="tests.launch_targets", **kw)))

    @flow
    def one_stage():
        state = pipeline.run_stage.with_options(retries=0)("fail", recipe, "parent", {}, return_state=True)
        return state.is_failed(), str(state.result(raise_on_failure=False))

    failed, error = one_stage()
    assert failed and FAIL_MESSAGE in error and "rank 1" in error


def test_cold_start_on_a_given_dataset_needs_no_r1_zero_run_and_is_reused(prefect_harness, tmp_path):
    from flows.pipeline import r1_pipeline
    from tests.test_stage_sft_stages import _cot_file

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = _cot_file(tmp_path / "cot.jsonl", n=40)
    over = {**MINI, "tracking.uri": uri, "output_dir": str(tmp_path / "runs"),
            "cold_start_sft.data": {"source": "path", "path": data},
            "cold_start_sft.sft": {"max_steps": 4, "batch_size": 8, "warmup_steps": 1}}
    chain = ["base_model", "cold_start_sft"]
    first = r1_pipeline(recipe="tiny", stages=chain, overrides=over)  # no r1_zero run exists, none is asked for
    assert first["skipped"] == []
    again = r1_pipeline(recipe="tiny", stages=chain, overrides=over)
    assert again["skipped"] == chain and again["stages"] == first["stages"]


def test_new_eval_settings_reevaluate_without_training_and_a_changed_data_file_retrains(prefect_harness, monkeypatch,
                                                                                       tmp_path):
    from flows.pipeline import r1_pipeline
    from stages.core.sft import SFTTrainer
    from tests.test_stage_sft_stages import _cot_file

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = tmp_path / "cot.jsonl"
    over = {**MINI, "tracking.uri": uri, "output_dir": str(tmp_path / "runs"),
            "cold_start_sft.data": {"source": "path", "path": _cot_file(data, n=40)},
            "cold_start_sft.sft": {"max_steps": 4, "batch_size": 8, "warmup_steps": 1}}
    chain = ["base_model", "cold_start_sft"]
    first = r1_pipeline(recipe="tiny", stages=chain, overrides=over)
    assert first["skipped"] == [] and first["evaluated"] == {}

    def no_training(*a, **k):  # base_model's build and cold start both train with the SFT loop
        raise AssertionError("a stage was trained again")

    monkeypatch.setattr(SFTTrainer, "train", no_training)
    fewer = {**over, "eval.num_prompts": 4}
    reeval = r1_pipeline(recipe="tiny", stages=chain, overrides=fewer)
    assert reeval["skipped"] == chain and reeval["stages"] == first["stages"]
    assert sorted(reeval["evaluated"]) == chain and len(_stage_runs(uri)) == 4  # 2 trained, 2 evaluations
    for name, run_id in reeval["evaluated"].items():
        run = mlflow.get_run(run_id)
        assert run.data.metrics["eval/num_prompts"] == 4 and run.data.params["eval.num_prompts"] == "4"
        assert run.data.tags["r1.evaluated_run"] == first["stages"][name]["run_id"]
        assert run.data.tags["r1.pipeline_run_id"] == reeval["pipeline_run_id"]
        assert mlflow.get_run(first["stages"][name]["run_id"]).data.metrics["eval/num_prompts"] == 8  # left as it was
    summary = mlflow.artifacts.load_text(f"runs:/{reeval['pipeline_run_id']}/summary.md")
    assert summary.count("reused, evaluated in") == 2
    from flows.compare import compare_rows
    from stages.core.recipe import load_recipe

    rows = compare_rows(load_recipe("tiny", fewer), pipeline_run_id=reeval["pipeline_run_id"])
    assert sorted(r["stage"] for r in rows) == ["base_model eval", "cold_start_sft eval"]

    again = r1_pipeline(recipe="tiny", stages=chain, overrides=fewer)  # that evaluation is found, not made twice
    assert again["evaluated"] == reeval["evaluated"] and len(_stage_runs(uri)) == 4
    back = r1_pipeline(recipe="tiny", stages=chain, overrides=over)  # the stage runs hold the first settings' one
    assert back["skipped"] == chain and back["evaluated"] == {} and len(_stage_runs(uri)) == 4

    monkeypatch.undo()
    _cot_file(data, n=48)  # the same path, new content
    changed = r1_pipeline(recipe="tiny", stages=chain, overrides=over)
    assert changed["skipped"] == ["base_model"] and len(_stage_runs(uri)) == 5
    assert changed["stages"]["cold_start_sft"]["run_id"] != first["stages"]["cold_start_sft"]["run_id"]
