"""What a stage run shows in the MLflow UI: a model-training experiment, the model as a pyfunc that generates, the data
sets it trained and was evaluated on, system metrics, GRPO completions tables and a plot of its curves."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest

from stages.core import tracking
from tests.conftest import MINI

SMALL_RL = {"r1_zero.grpo.prompts_per_step": 2, "r1_zero.grpo.num_generations": 2,
            "r1_zero.grpo.steps_per_iteration": 4, "r1_zero.grpo.max_completion_length": 12,
            "r1_zero.grpo.log_every": 1, "r1_zero.data.num_prompts": 16, "r1_zero.samples_to_log": 3,
            "r1_zero.log_completions_every": 3}


@pytest.fixture(scope="module")
def stage_runs(mini_base, tmp_path_factory):
    """A mini base_model stage (the SFT loop) and a 4-step r1_zero stage on the session's mini base, one store."""
    from stages import base_model, r1_zero
    from stages.core.recipe import load_recipe

    root = tmp_path_factory.mktemp("ux_store")
    recipe = load_recipe("tiny", {**MINI, **SMALL_RL, "tracking.uri": f"sqlite:///{root}/mlflow.db",
                                  "output_dir": str(root / "runs")})
    old = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.2"  # the default 10 s outlasts a mini stage
    try:
        base = base_model.run(recipe, progress=False)
        rl = r1_zero.run(recipe, {"model": mini_base}, progress=False)
    finally:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        if old is not None:
            os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = old
    return recipe, base, rl


def test_experiment_opens_on_the_runs_table(stage_runs, tmp_path):
    recipe, _, _ = stage_runs
    exp = mlflow.get_experiment_by_name(recipe.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # an experiment made before the tag existed is tagged when a stage next uses it
    cfg = recipe.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/old.db", "experiment": "old"})
    mlflow.set_tracking_uri(cfg.uri)
    exp_id = mlflow.create_experiment("old")
    assert "mlflow.experimentKind" not in mlflow.get_experiment(exp_id).tags
    assert tracking.setup(cfg) == exp_id
    assert mlflow.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    mlflow.set_tracking_uri(recipe.tracking.uri)


def test_registered_model_is_a_pyfunc_that_generates(stage_runs):
    import pandas as pd

    _, base, rl = stage_runs
    for stage, out in (("base_model", base), ("r1_zero", rl)):
        model = mlflow.pyfunc.load_model(f"models:/r1-tiny-{stage}@current")
        assert model.metadata.run_id == out["run_id"]
        logged = json.loads(mlflow.get_run(out["run_id"]).data.tags["mlflow.log-model.history"])
        assert [(m["artifact_path"], list(m["flavors"])) for m in logged] == [("model", ["python_function"])]
        sig = model.metadata.signature
        assert sig.inputs.input_names() == ["prompt"] and sig.outputs.input_names() == ["completion"]
        prompts = ["User: What is 12 + 7?\nAssistant:", "User: What is 3 + 40?\nAssistant:"]
        res = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 8})
        assert list(res.columns) == ["completion"] and len(res) == 2
        assert all(isinstance(c, str) and c for c in res["completion"])
        # greedy by default: the same prompt gives the same text
        again = model.predict(pd.DataFrame({"prompt": prompts[:1]}), params={"max_new_tokens": 8})
        assert again["completion"][0] == res["completion"][0]
    # requirements pinned to what is installed; the Hugging Face files still sit at the top of model/
    path = Path(mlflow.artifacts.download_artifacts(f"runs:/{rl['run_id']}/model"))
    reqs = (path / "requirements.txt").read_text().split()
    assert f"transformers=={version('transformers')}" in reqs and any(r.startswith("torch==") for r in reqs)
    assert {"config.json", "model.safetensors", "MLmodel"} <= {f.name for f in path.iterdir()}
    # one version per stage run, alias current
    versions = mlflow.MlflowClient().search_model_versions("name = 'r1-tiny-r1_zero'")
    assert [v.run_id for v in versions] == [rl["run_id"]]


def test_runs_show_their_data_sets_with_digests(stage_runs):
    _, base, rl = stage_runs
    for out, trained in ((base, "pretraining"), (rl, "r1_zero-prompts")):
        inputs = mlflow.get_run(out["run_id"]).inputs.dataset_inputs
        by_name = {d.dataset.name: d for d in inputs}
        assert {trained, "heldout"} <= set(by_name)
        ctx = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in by_name.items()}
        assert ctx[trained] == "training" and ctx["heldout"] == "evaluation"
        assert len(by_name[trained].dataset.digest) >= 8
        assert json.loads(by_name["heldout"].dataset.source)["uri"].startswith("generated:addition")
    profile = json.loads({d.dataset.name: d for d in mlflow.get_run(rl["run_id"]).inputs.dataset_inputs}
                         ["r1_zero-prompts"].dataset.profile)
    assert profile["num_rows"] == 16


def test_logging_synthesized_rows_warns_nothing_and_declares_integers_as_doubles(tmp_path):
    """MLflow's schema inference warned ("Inferred schema contains integer column(s)") on every stage that logged
    synthesized rows: `sample_index` is an integer, and `length` one that general rows lack."""
    import warnings

    from stages.core.rejection import to_row

    sample = {"prompt": "p", "completion": " 3", "question": "1+2", "answer": "3", "prompt_id": "r0",
              "sample_index": 1, "accuracy": 1.0, "length": 4}
    general = {"prompt": "q", "completion": " hi", "kind": "general", "prompt_id": "g0", "sample_index": 0,
               "reward": 1.0}
    before = mlflow.get_tracking_uri()  # the module's stage runs are read through it by the tests after this one
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        for rows in ([to_row(sample, "runs:/x")], [to_row(sample, "runs:/x"), general]):
            with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tracking.log_dataset(rows, "synthesized", "runs:/x/data", "training")
            shown = [str(w.message)[:80] for w in caught if not issubclass(w.category, DeprecationWarning)]
            assert shown == []  # what the console would print (deprecations inside MLflow's digest are hidden)
            (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
            types = {c["name"]: c["type"] for c in json.loads(logged.dataset.schema)["mlflow_colspec"]}
            assert types["sample_index"] == types["length"] == types["reward"] == "double"
            assert types["prompt"] == "string"
    finally:
        mlflow.set_tracking_uri(before)


def test_stage_runs_log_system_metrics(stage_runs):
    _, base, rl = stage_runs
    for out in (base, rl):
        keys = set(mlflow.get_run(out["run_id"]).data.metrics)
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys


def test_grpo_logs_completions_tables(stage_runs):
    _, _, rl = stage_runs
    client = mlflow.MlflowClient()
    files = sorted(a.path for a in client.list_artifacts(rl["run_id"], "completions"))
    assert files == ["completions/step_0003.json", "completions/step_0004.json"]  # every 3 steps, and the last
    table = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{rl['run_id']}/completions/step_0003.json"))
                       .read_text())
    cols = table["columns"]
    assert cols == ["step", "prompt", "completion", "reward/accuracy", "reward/format", "reward", "advantage"]
    rows = [dict(zip(cols, r, strict=True)) for r in table["data"]]
    assert len(rows) == 3 and {r["step"] for r in rows} == {3}
    for r in rows:  # total = 1.0·accuracy + 0.5·format (the tiny recipe's weights)
        assert r["reward"] == pytest.approx(r["reward/accuracy"] + 0.5 * r["reward/format"])
    # rows 0 and 1 are one prompt's group (G = 2): advantages ±1/√2 (centred, over the unbiased std), the better
    # completion positive; 0 when both scored the same
    first, second = rows[0], rows[1]
    assert first["prompt"] == second["prompt"]
    if first["reward"] == second["reward"]:
        assert first["advantage"] == second["advantage"] == 0
    else:
        sign = 1 if first["reward"] > second["reward"] else -1
        assert first["advantage"] == pytest.approx(sign * 2 ** -0.5, abs=1e-4)
        assert second["advantage"] == pytest.approx(-sign * 2 ** -0.5, abs=1e-4)


def test_stage_runs_log_a_png_of_their_curves(stage_runs):
    _, base, rl = stage_runs
    for out in (base, rl):
        run = mlflow.get_run(out["run_id"])
        uri = run.data.tags[tracking.PLOT_TAG]
        assert uri == f"runs:/{out['run_id']}/curves.png"
        with open(mlflow.artifacts.download_artifacts(uri), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
