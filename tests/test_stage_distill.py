"""distill: students sized against the teacher before anything trains, the synthesized set read, a full run with
students, baselines and the teacher evaluated."""

import json

import mlflow
import pytest

from stages import distill

TINY_STUDENT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "intermediate_size": 32}


def _recipe(mini_recipe, students, **overrides):
    from stages.core.recipe import Recipe, _set_dotted

    data = mini_recipe.model_dump()
    for k, v in {"distill.students": students, "distill.sft.max_steps": 3, "distill.sft.warmup_steps": 1,
                 "distill.sft.batch_size": 8, **overrides}.items():
        _set_dotted(data, k, v)
    return Recipe.model_validate(data)


@pytest.fixture
def teacher(mini_recipe, tmp_path):
    from stages.base_model import build_base_model

    return build_base_model(mini_recipe, tmp_path / "teacher", progress=False).path


@pytest.fixture
def synthesized(mini_recipe, tmp_path):
    """A stand-in for the synthesize stage's data/: clean (correct, well-formed) traces plus general replies."""
    from stages.core.configs import DataSource
    from stages.core.data import load_problems, save_rows
    from stages.core.tasks import clean_trace

    t = mini_recipe.prompt.template
    rows = [{"prompt": t.format(question=p.question), "completion": " " + clean_trace(p), "kind": "reasoning"}
            for p in load_problems(DataSource(num_prompts=24), "train", seed=3)]
    rows += [{"prompt": t.format(question=p.question), "completion": " " + p.answer, "kind": "general"}
             for p in load_problems(DataSource(task="general", num_prompts=8), "train", seed=3)]
    return save_rows(rows, tmp_path / "data")


def test_parameter_count_from_config_matches_the_built_model():
    from stages.core.config_base import ModelArch

    arch = distill.arch_config(ModelArch(**TINY_STUDENT), 323, 1, 0)
    model = distill.build_student(arch, 0)
    assert distill.count_parameters(arch) == sum(p.numel() for p in model.parameters())
    est = distill._estimate_parameters(arch)  # the fallback for unknown model types is close
    assert abs(est - distill.count_parameters(arch)) / est < 0.05


def test_student_not_smaller_than_teacher_is_refused_before_anything_trains(mini_recipe, teacher, synthesized,
                                                                            monkeypatch):
    import stages.core.sft

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(stages.core.sft.SFTTrainer, "__init__", no_training)
    big = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128}
    recipe = _recipe(mini_recipe, [{"name": "small", "model": TINY_STUDENT}, {"name": "too-big", "model": big}])
    with pytest.raises(distill.StudentSizeError, match="'too-big'"):
        distill.run(recipe, inputs={"data": str(synthesized), "teacher": str(teacher)}, progress=False)
    # the teacher itself as a student (a path) is not smaller either
    recipe = _recipe(mini_recipe, [{"name": "same", "path": str(teacher)}])
    with pytest.raises(distill.StudentSizeError, match="'same'"):
        distill.run(recipe, inputs={"data": str(synthesized), "teacher": str(teacher)}, progress=False)
    # the teacher as a runs:/ URI: only its config.json is read, from the recipe's store whatever MLflow pointed at
    from stages.core import tracking

    with tracking.stage_run(recipe.tracking, "preference_rl", {}, recipe.name) as prev:
        mlflow.log_artifacts(str(teacher), "model")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    recipe = _recipe(mini_recipe, [{"name": "too-big", "model": big}])
    with pytest.raises(distill.StudentSizeError, match="'too-big'"):
        distill.run(recipe, inputs={"data": str(synthesized), "teacher": f"runs:/{prev.info.run_id}/model"},
                    progress=False)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(recipe.tracking.experiment).experiment_id],
                              output_format="list")
    assert [r.data.tags["r1.stage"] for r in runs] == ["preference_rl"]  # no distill run was opened


def test_student_names_and_configs_are_checked():
    from pydantic import ValidationError

    from stages.core.configs import DistillConfig

    with pytest.raises(ValidationError, match="unique"):
        DistillConfig.model_validate({"students": [{"name": "a", "model": {}}, {"name": "a", "model": {}}]})
    with pytest.raises(ValidationError, match="students.0.name"):
        DistillConfig.model_validate({"students": [{"name": "a/b", "model": {}}]})
    with pytest.raises(ValidationError, match="exactly one of path or model"):
        DistillConfig.model_validate({"students": [{"name": "a"}]})


def test_synthesized_data_is_read_or_refused_naming_the_columns(tmp_path, synthesized):
    from stages.core.data import save_rows
    from stages.core.lineage import StageInputError

    rows = distill.load_sft_examples(str(synthesized), "User: {question}\nAssistant:")
    assert len(rows) == 32 and set(rows[0]) == {"prompt", "completion"}
    q = save_rows([{"question": "1+2", "completion": " <answer>3</answer>"}], tmp_path / "q")
    assert distill.load_sft_examples(str(q), "Q: {question}\nA:") == [
        {"prompt": "Q: 1+2\nA:", "completion": " <answer>3</answer>"}]
    bad = save_rows([{"prompt": "x", "text": "y"}], tmp_path / "bad")
    with pytest.raises(StageInputError, match="needs columns prompt .* completion.*'text'"):
        distill.load_sft_examples(str(bad), "{question}")
    with pytest.raises(StageInputError, match="does not exist"):
        distill.load_sft_examples(str(tmp_path / "missing"), "{question}")


def test_distill_end_to_end_logs_students_baselines_and_teacher(mini_recipe, teacher, synthesized):
    from stages.core.models import load_model_and_tokenizer

    students = [{"name": "s16", "model": TINY_STUDENT},
                {"name": "s8", "model": {**TINY_STUDENT, "hidden_size": 8, "intermediate_size": 16}}]
    recipe = _recipe(mini_recipe, students)
    out = distill.run(recipe, inputs={"data": str(synthesized), "teacher": str(teacher)}, progress=False)

    assert json.loads(out["students"]) == ["s16", "s8"]
    assert out["model"] == f"runs:/{out['run_id']}/students/s16"
    run = mlflow.get_run(out["run_id"])
    m = run.data.metrics
    assert run.data.tags["r1.stage"] == "distill"
    for name in ("s16", "s8", "s16_baseline", "s8_baseline", "teacher"):
        for k in ("pass_at_1", "greedy_accuracy", "format_rate", "language_consistency"):
            assert 0.0 <= m[f"eval/{name}/{k}"] <= 1.0, (name, k)
    assert m["eval/pass_at_1"] == m["eval/s16/pass_at_1"]  # the headline evaluation is the first student's
    for name in ("s16", "s8"):
        assert m[f"distill/{name}/steps"] == 3 and m[f"distill/{name}_baseline/steps"] == 3
        assert m[f"distill/{name}/parameters"] < m["distill/teacher_parameters"]
        assert f"distill/{name}/pass_at_1_gain" in m
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(out["run_id"], "students")} == {"students/s16", "students/s8"}
    model, tok = load_model_and_tokenizer(out["model"])
    assert model.config.hidden_size == 16 and len(tok) == model.config.vocab_size

    # a rerun on the same inputs reuses the finished students and baselines from the work dir
    again = distill.run(recipe, inputs={"data": str(synthesized), "teacher": str(teacher)}, progress=False)
    m2 = mlflow.get_run(again["run_id"]).data.metrics
    assert m2["distill/s16/train_seconds"] == m["distill/s16/train_seconds"]
