"""Recipe validation: presets load, and every bad value fails naming its field, before anything heavy."""

import pytest
from typer.testing import CliRunner

from flows.cli import app
from stages.core.recipe import RecipeError, flatten, load_recipe, presets


def test_presets_validate():
    assert {"tiny", "qwen2.5-1.5b", "qwen2.5-7b"} <= set(presets())
    tiny = load_recipe("tiny")
    full = load_recipe("qwen2.5-7b")
    assert tiny.base_model.source == "build" and tiny.device == "cpu"
    assert full.base_model.source == "pretrained" and full.cluster.nodes * full.cluster.gpus_per_node == 32
    assert full.prompt.style == "chat" and "<think>" in full.prompt.system


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"eval.num_prompts": 0}, "eval.num_prompts"),
        ({"eval.temperature": -1}, "eval.temperature"),
        ({"base_model.model.hidden_size": 130}, "base_model.model"),  # not divisible by 4 heads
        ({"base_model.model.num_key_value_heads": 3}, "base_model.model"),
        ({"base_model.noise.wrong_answer": 1.5}, "base_model.noise.wrong_answer"),
        ({"base_model.source": "pretrained"}, "base_model"),  # no path
        ({"base_model.source": "downloaded"}, "base_model.source"),
        ({"base_model.learning_rate": 0}, "base_model.learning_rate"),
        ({"prompt.template": "no placeholder"}, "prompt"),
        ({"cluster.nodes": 2}, "cluster"),  # multi-node needs a multi-node launcher
        ({"eval.sample_per_prompt": 4}, "eval.sample_per_prompt"),  # typo: unknown keys are errors
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny", overrides)
    assert f" {field}:" in str(e.value)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="neither a file nor a preset"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_yaml_file_roundtrip(tmp_path):
    import yaml

    tiny = load_recipe("tiny", {"seed": 7, "eval.num_prompts": 16})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny.model_dump()))
    again = load_recipe(path)
    assert again == tiny and again.seed == 7
    flat = flatten(again)
    assert flat["eval.num_prompts"] == "16" and flat["base_model.model.hidden_size"] == "128"


def test_cli_validate_reports_field_and_exit_code():
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", "tiny"])
    assert ok.exit_code == 0 and "valid" in ok.output
    bad = runner.invoke(app, ["validate", "tiny", "--set", "eval.num_prompts=-3"])
    assert bad.exit_code == 2 and "eval.num_prompts" in bad.output
    assert runner.invoke(app, ["validate", "qwen2.5-7b"]).exit_code == 0


def test_cli_help_explains_commands():
    out = CliRunner().invoke(app, ["--help"]).output
    for cmd in ("pipeline", "stage", "evaluate", "validate", "presets", "base-model"):
        assert cmd in out
