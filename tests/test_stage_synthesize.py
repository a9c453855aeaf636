"""Rejection sampling filters, and the synthesize stage end to end: MLflow data artifact, counts, a missed target,
resume from shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from stages.core.recipe import PromptConfig
from stages.core.rejection import Counts, Filters, RejectionSampler, apply_filters, normalize_completion, score, to_row

GOOD = " <think>1+2=3, write 3. so the answer is 3.</think><answer>3</answer>"


def _cand(completion, prompt_id="r0", sample_index=0, length=20, truncated=False, answer="3"):
    return {"prompt": "User: 1+2\nAssistant:", "completion": completion, "question": "1+2", "answer": answer,
            "task": "addition", "metadata": "{}", "prompt_id": prompt_id, "sample_index": sample_index,
            "length": length, "truncated": truncated}


def test_each_filter_rejects_what_it_should():
    cands = [
        _cand(GOOD, sample_index=0),  # kept
        _cand(GOOD.replace("<answer>3", "<answer>4"), sample_index=1),  # incorrect
        _cand(" <think>1+2=3, 写 3. 所以 答案 是 3.</think><answer>3</answer>", sample_index=2),  # mixed language
        _cand(" <think>1+2=3, write 3. so the answer is 3.</think> 3 <answer>3</answer>", sample_index=3),  # format
        _cand(GOOD, sample_index=4, length=61),  # over the length limit
        _cand(GOOD, sample_index=5, truncated=True),  # cut off at max_new_tokens
        _cand(GOOD.replace("so the", "So  the"), sample_index=6),  # duplicate of sample 0 after normalising
        _cand(GOOD, prompt_id="r1", sample_index=0),  # same text, another prompt: not a duplicate
    ]
    kept, counts = apply_filters(score(cands, "en"), Filters(max_completion_tokens=60))
    assert [(c["prompt_id"], c["sample_index"]) for c in kept] == [("r0", 0), ("r1", 0)]
    assert counts.generated == 8 and counts.passed == 2 and counts.rejected == 6
    assert dict(counts.by_filter) == {"incorrect": 1, "mixed_language": 1, "bad_format": 1, "too_long": 2,
                                      "duplicate": 1}
    assert "incorrect=1" in counts.why() and "too_long=2" in counts.why()

    # each filter can be switched off
    loose = Filters(require_correct=False, require_language=False, require_format=False, dedupe=False)
    kept, counts = apply_filters(score(cands, "en"), loose)
    assert [c["sample_index"] for c in kept] == [0, 1, 2, 3, 4, 6, 0]
    assert dict(counts.by_filter) == {"too_long": 1}


def test_no_think_block_is_mixed_language_and_bad_format():
    kept, counts = apply_filters(score([_cand(" 1+2=3 so the answer is 3. 3")], "en"), Filters())
    assert not kept and counts.by_filter["bad_format"] == 1 and counts.by_filter["mixed_language"] == 1


def test_duplicates_are_remembered_across_calls_and_rows_carry_provenance():
    seen: set = set()
    first, _ = apply_filters(score([_cand(GOOD)], "en"), Filters(), seen)
    again, counts = apply_filters(score([_cand(GOOD.replace(" ", "  ") + "\n")], "en"), Filters(), seen)
    assert len(first) == 1 and not again and dict(counts.by_filter) == {"duplicate": 1}
    assert normalize_completion("  A  b\nC ") == "a b c"
    row = to_row(first[0], "runs:/abc/model")
    assert row["source_run"] == "runs:/abc/model" and row["prompt_id"] == "r0" and row["sample_index"] == 0
    assert row["reward"] == 1.0 and row["kind"] == "reasoning"
    assert {"prompt", "completion", "question", "answer"} <= set(row)


def test_counts_round_trip_json():
    c = Counts(prompts=2, generated=8, passed=3, rejected=5)
    c.by_filter.update(["incorrect", "incorrect", "duplicate"])
    assert Counts.from_json(c.to_json()) == c
    assert c.metrics("x/")["x/rejected_incorrect"] == 2.0 and c.metrics("x/")["x/acceptance_rate"] == 3 / 8


# ---- with a model -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    """A mini model pretrained long enough to write tags and stop (well-formed samples exist), in seconds."""
    from stages.base_model import build_base_model
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    recipe = load_recipe("tiny", {**MINI, "base_model.max_steps": 150, "base_model.batch_size": 32,
                                  "base_model.learning_rate": 1e-2, "base_model.train_problems": 1000,
                                  "base_model.noise.no_tags": 0.0})
    out = tmp_path_factory.mktemp("synth_mini") / "model"
    build_base_model(recipe, out, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's stage runs (creating a sqlite store costs seconds)."""
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    root = tmp_path_factory.mktemp("synth_store")

    def recipe(**synth):
        over = {**MINI, "tracking.uri": f"sqlite:///{root}/mlflow.db", "output_dir": str(root / "runs"),
                "synthesize.max_prompts": 32, "synthesize.samples_per_prompt": 4, "synthesize.batch_prompts": 8,
                "synthesize.require_correct": False, "synthesize.reasoning_target": 20,
                "synthesize.general_target": 10, "synthesize.shard_size": 6}
        return load_recipe("tiny", over | {f"synthesize.{k}": v for k, v in synth.items()})

    return recipe


def _workdir(recipe, run_id) -> Path:
    key = mlflow.get_run(run_id).data.tags["r1.stage_key"]
    return Path(recipe.output_dir) / "synthesize" / key[:16]


def test_sampler_batches_are_seeded_by_index(mini_model):
    from grpo.rollout import HFGenerateBackend
    from stages.core.configs import DataSource
    from stages.core.data import load_problems
    from stages.core.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(mini_model)
    probs = load_problems(DataSource(num_prompts=8), "train", seed=0)
    s = RejectionSampler(HFGenerateBackend(model, tok), probs, source_run="m", prompt=PromptConfig(),
                         samples_per_prompt=2, temperature=1.0, max_new_tokens=48,
                         filters=Filters(require_correct=False), batch_prompts=4, seed=3)
    a = s.candidates(1)
    s.candidates(0)
    assert s.candidates(1) == a and len(a) == 8 and s.num_batches == 2
    assert [c["prompt_id"] for c in a[::2]] == ["r4", "r5", "r6", "r7"]


def test_synthesize_end_to_end_and_resume_from_a_shard(store, mini_model):
    from stages import synthesize
    from stages.core.data import load_rows

    recipe = store()
    out = synthesize.run(recipe, {"model": mini_model}, progress=False)
    assert out["data"] == f"runs:/{out['run_id']}/data" and "model" not in out
    run = mlflow.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["r1.stage"] == "synthesize"
    rows = load_rows(mlflow.artifacts.download_artifacts(artifact_uri=out["data"]))
    assert len(rows) == 30
    reasoning = [r for r in rows if r["kind"] == "reasoning"]
    general = [r for r in rows if r["kind"] == "general"]
    assert len(reasoning) == 20 and len(general) == 10
    assert all(r["source_run"] == mini_model and r["prompt"].startswith("User: ") for r in reasoning)
    assert all("<think>" in r["completion"] and "<answer>" in r["completion"] for r in reasoning)
    assert all("<think>" not in r["completion"] and r["reward"] == 1.0 for r in general)
    assert len({(r["prompt_id"], normalize_completion(r["completion"])) for r in reasoning}) == 20
    m = run.data.metrics
    assert m["synth/reasoning_rows"] == 20 and m["synth/general_rows"] == 10
    assert m["synth/passed"] + m["synth/rejected"] == m["synth/generated"] > 0
    assert 0 < m["synth/acceptance_rate"] <= 1 and m["synth/reasoning_target_reached"] == 1
    assert "r1.synthesize.target_not_reached" not in run.data.tags
    assert "samples.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])}

    # a crash after the first shard: the final output and later shards are gone; the rerun redoes exactly those
    work = _workdir(recipe, out["run_id"])
    shards = sorted((work / "shards" / "rank-0").iterdir())
    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    shutil.rmtree(work / "data")
    for s in shards[1:]:
        shutil.rmtree(s)
    again = synthesize.run(recipe, {"model": mini_model}, progress=False)
    assert _workdir(recipe, again["run_id"]) == work
    assert load_rows(mlflow.artifacts.download_artifacts(artifact_uri=again["data"])) == rows
    assert mlflow.get_run(again["run_id"]).data.metrics["synth/generated"] == m["synth/generated"]


def test_unreachable_target_warns_with_the_numbers(store, mini_model):
    from stages import synthesize

    recipe = store(max_prompts=4, samples_per_prompt=2, reasoning_target=50, general_target=5)
    with pytest.warns(synthesize.TargetNotReachedWarning,
                      match=r"kept \d+ of reasoning_target=50 .* 8 samples from 4 prompts.*mixed_language="):
        out = synthesize.run(recipe, {"model": mini_model}, progress=False)
    run = mlflow.get_run(out["run_id"])
    assert "reasoning_target=50" in run.data.tags["r1.synthesize.target_not_reached"]
    assert run.data.metrics["synth/reasoning_target_reached"] == 0
    assert 0 < run.data.metrics["synth/reasoning_rows"] < 50


def test_nothing_surviving_is_an_error_naming_the_filters(store, mini_model):
    from stages import synthesize

    recipe = store(max_prompts=4, samples_per_prompt=2, max_completion_tokens=1)
    with pytest.raises(synthesize.SynthesisError, match="too_long=8"):
        synthesize.run(recipe, {"model": mini_model}, progress=False)


def test_bad_targets_fail_before_any_model_loads(store):
    from stages import synthesize

    with pytest.raises(ValueError, match="both 0"):
        synthesize.run(store(reasoning_target=0, general_target=0), {"model": "/no/such/model"}, progress=False)
