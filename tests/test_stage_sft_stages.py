"""cold_start_sft (given dataset; errors naming the column and file) and general_sft (from a synthesize run's data URI),
run through their stage `run` functions with MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest

from stages.core.data import DataInputError


@pytest.fixture(scope="module")
def base(mini_base):
    return mini_base


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's stage runs (creating a sqlite store costs seconds)."""
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    root = tmp_path_factory.mktemp("sft_store")
    sft = {"max_steps": 30, "batch_size": 16, "learning_rate": 5e-3, "warmup_steps": 2, "log_every": 1}

    def recipe(**over):
        base_over = {**MINI, "tracking.uri": f"sqlite:///{root}/mlflow.db", "output_dir": str(root / "runs"),
                     "cold_start_sft.sft": sft, "general_sft.sft": sft | {"max_steps": 10}}
        return load_recipe("tiny", base_over | over)

    return recipe


def _cot_file(path, n=80, drop=()):
    from stages.core.tasks import clean_trace, make_problems

    with open(path, "w") as f:
        for p in make_problems("addition", n, seed=5):
            row = {"question": p.question, "answer": p.answer, "completion": " " + clean_trace(p),
                   "prompt": f"User: {p.question}\nAssistant:"}
            f.write(json.dumps({k: v for k, v in row.items() if k not in drop}) + "\n")
    return str(path)


def test_cold_start_on_a_given_dataset(store, base, tmp_path):
    from stages import cold_start_sft

    data = _cot_file(tmp_path / "cot.jsonl", drop=("prompt",))  # question/answer + completion
    recipe = store(**{"cold_start_sft.data": {"source": "path", "path": data}})
    out = cold_start_sft.run(recipe, {"model": base}, progress=False)
    rid = out["run_id"]
    assert out["model"] == f"runs:/{rid}/model" and out["data"] == f"runs:/{rid}/data"
    run = mlflow.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["r1.stage"] == "cold_start_sft"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(rid)}
    assert {"model", "data", "samples.json", "data_samples.json"} <= arts

    from stages.core.data import load_rows
    from stages.core.models import check_model_dir, resolve_model_uri

    check_model_dir(resolve_model_uri(out["model"]))
    rows = load_rows(mlflow.artifacts.download_artifacts(artifact_uri=out["data"]))
    assert 0 < len(rows) <= 80 and rows[0]["prompt"] == f"User: {rows[0]['question']}\nAssistant:"
    from stages.core.data import split_of

    assert all(split_of(r["question"]) == "train" for r in rows)  # held-out questions never trained on

    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(rid, "sft/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert "eval/pass_at_1" in run.data.metrics and run.data.metrics["sft_final/steps"] == 30


def test_cold_start_dataset_missing_column_names_it_and_the_file(store, base, tmp_path):
    from stages import cold_start_sft

    no_completion = _cot_file(tmp_path / "a.jsonl", n=8, drop=("completion",))
    recipe = store(**{"cold_start_sft.data": {"source": "path", "path": no_completion}})
    with pytest.raises(DataInputError, match=r"a\.jsonl: missing column 'completion'"):
        cold_start_sft.run(recipe, {"model": base}, progress=False)

    no_question = _cot_file(tmp_path / "b.jsonl", n=8, drop=("prompt", "question"))
    recipe = store(**{"cold_start_sft.data": {"source": "path", "path": no_question}})
    with pytest.raises(DataInputError, match=r"b\.jsonl: missing column\(s\) 'question'"):
        cold_start_sft.run(recipe, {"model": base}, progress=False)

    mapped = _cot_file(tmp_path / "c.jsonl", n=8, drop=("prompt",))
    recipe = store(**{"cold_start_sft.data": {"source": "path", "path": mapped, "columns": {"completion": "cot"}}})
    with pytest.raises(DataInputError, match=r"missing column 'cot' \(for completion\)"):
        cold_start_sft.run(recipe, {"model": base}, progress=False)


def test_general_sft_from_a_synthesize_run(store, base, tmp_path):
    from stages import general_sft, synthesize

    recipe = store(**{"synthesize.reasoning_target": 0, "synthesize.general_target": 24})
    synth = synthesize.run(recipe, {"model": base}, progress=False)
    out = general_sft.run(recipe, {"model": base, "data": synth["data"]}, progress=False)
    run = mlflow.get_run(out["run_id"])
    assert set(out) == {"run_id", "model"} and out["model"] == f"runs:/{out['run_id']}/model"
    assert run.info.status == "FINISHED" and run.data.params["input.data"] == synth["data"]
    assert run.data.metrics["data/examples"] == 24 and run.data.metrics["data/general_examples"] == 24
    assert run.data.metrics["sft_final/steps"] == 10
    assert "model" in {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])}

    from stages.core.data import save_rows

    bad = save_rows([{"prompt": "User: hi\nAssistant:"}], tmp_path / "bad")
    with pytest.raises(DataInputError, match=r"missing column\(s\) \['completion'\]"):
        general_sft.run(recipe, {"model": base, "data": str(bad)}, progress=False)


def test_cold_start_built_from_r1_zero_names_the_filters_when_nothing_is_readable(store, base):
    """Without a dataset the set is rejection-sampled from the R1-Zero model; an 8-step model writes nothing readable,
    and the error says why (per-filter counts) instead of training on nothing."""
    from stages import cold_start_sft

    recipe = store(**{"cold_start_sft.num_prompts": 8, "cold_start_sft.samples_per_prompt": 2,
                      "cold_start_sft.max_new_tokens": 16})
    with pytest.raises(RuntimeError, match=r"no readable sample .* 16 samples from 8 prompts.*too_long="):
        cold_start_sft.run(recipe, {"model": base, "r1_zero_model": base}, progress=False)
    with pytest.raises(Exception, match="r1_zero"):  # no explicit R1-Zero model and no finished r1_zero run
        cold_start_sft.run(recipe, {"model": base}, progress=False)


def test_every_trainer_follows_the_recipe_seed(monkeypatch, tmp_path):
    """`--set seed=N` reseeds each stage's trainer (GRPO sampling, SFT data order), not only the problems and the base
    model: the stage's own seed is an offset. (Every trainer ran with its section's seed 0 whatever the recipe's seed,
    so the tiny chain's seeds 1 and 2 shared their RL sampling and SFT order with seed 0.)"""
    import grpo
    from stages import distill
    from stages.core import grpo_runner, sft_runner
    from stages.core.context import StageContext
    from stages.core.recipe import load_recipe

    class Built(Exception):
        pass

    seeds = []

    def built(cfg):
        seeds.append(cfg.seed)
        raise Built

    monkeypatch.setattr(grpo, "GRPOTrainer", lambda model, tok, cfg, *a, **k: built(cfg))
    for module in (sft_runner, distill):
        monkeypatch.setattr(module, "SFTTrainer", lambda model, tok, examples, cfg, *a, **k: built(cfg))
    monkeypatch.setattr(distill, "MLflowLogger", lambda **kwargs: None)
    recipe = load_recipe("tiny", {"seed": 3, "r1_zero.grpo.seed": 5, "general_sft.sft.seed": 7, "distill.sft.seed": 11})
    ctx = StageContext("test", recipe, "run", "key", tmp_path, {}, progress=False, main=False)
    with pytest.raises(Built):
        grpo_runner.train_grpo(ctx, recipe.r1_zero, None, None, [], [])
    with pytest.raises(Built):
        sft_runner.train_and_finish(ctx, recipe.general_sft.sft, None, None, [])
    with pytest.raises(Built):
        distill.sft_or_reuse(None, None, [], recipe.distill.sft, tmp_path / "student", ctx, "student")
    assert seeds == [5 + 3, 7 + 3, 11 + 3]
