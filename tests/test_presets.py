"""The real-scale presets: every stage at the papers' settings, nothing inherited from the tiny preset's toy scale.
load_recipe only: no model loads, no hub access (hub ids are resolved at preflight)."""

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from stages.core.recipe import PRESET_DIR, R1_ZERO_SYSTEM, RecipeError, load_recipe

REAL = {"qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", 1, "zero2.json", 8192),
        "qwen2.5-7b": ("Qwen/Qwen2.5-7B", 4, "zero3.json", 16384)}
RL = ("r1_zero", "reasoning_rl", "preference_rl")
SFT = ("cold_start_sft", "general_sft", "distill")


@pytest.mark.parametrize("preset", REAL)
def test_preset_is_real_scale(preset):
    path, nodes, zero, completion = REAL[preset]
    r = load_recipe(preset)
    assert (r.base_model.source, r.base_model.path) == ("pretrained", path)
    assert (r.cluster.nodes, r.cluster.gpus_per_node) == (nodes, 8) and r.cluster.deepspeed_config.endswith(zero)
    assert r.prompt.style == "chat" and r.prompt.system.split() == R1_ZERO_SYSTEM.split()
    world = nodes * 8
    for stage in RL:
        g = getattr(r, stage).grpo
        assert (g.precision, g.gradient_checkpointing, g.rollout_backend) == ("bf16", True, "vllm"), stage
        assert g.micro_batch_size is not None and g.world_problems(world) == [], stage
        assert g.max_completion_length == completion >= 4096 and g.max_prompt_length == 1024, stage
        assert (g.learning_rate, g.beta, g.num_generations, g.steps_per_iteration) == (3e-6, 0.001, 16, 400), stage
    assert r.r1_zero.grpo.temperature == 1.0 and r.r1_zero.grpo.total_steps == 10_400
    assert r.reasoning_rl.grpo.temperature == r.preference_rl.grpo.temperature == 0.7
    assert "language_consistency" in [s.name for s in r.reasoning_rl.rewards]
    assert [s.name for s in r.r1_zero.rewards] == ["accuracy", "format"]
    for stage in SFT:
        s = getattr(r, stage).sft
        assert (s.precision, s.gradient_checkpointing, s.micro_batch_size is not None) == ("bf16", True, True), stage
        assert 2 <= s.epochs <= 3 and s.max_steps is None and s.learning_rate == 5e-5, stage
        assert s.lr_schedule == "cosine" and s.world_problems(world) == [], stage
    assert (r.synthesize.reasoning_target, r.synthesize.general_target) == (600_000, 200_000)
    assert (r.eval.temperature, r.eval.samples_per_prompt) == (0.6, 16) and r.eval.max_new_tokens >= completion


def test_validate_show_prints_the_real_settings():
    out = CliRunner().invoke(app, ["validate", "qwen2.5-7b", "--show"])
    assert out.exit_code == 0, out.output
    shown = yaml.safe_load(out.output.split("\n", 1)[1])  # after the "is valid" line
    assert shown["r1_zero"]["grpo"]["max_completion_length"] == 16384
    for line in ("precision: bf16", "gradient_checkpointing: true", "rollout_backend: vllm"):
        assert line in out.output


def test_pretrained_recipe_must_write_out_every_stage(tmp_path):
    """A recipe on a real model that leaves a stage to its defaults would train at toy scale: refused, naming it."""
    full = yaml.safe_load((PRESET_DIR / "qwen2.5-7b.yaml").read_text())
    del full["distill"], full["reasoning_rl"]["grpo"], full["eval"]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(full))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).endswith("missing: eval, reasoning_rl.grpo, distill")
    assert "base_model.source is 'pretrained'" in str(e.value)
    # the test suite's way: tiny (every value written out) with a pretrained base model loads
    r = load_recipe("tiny", {"base_model.source": "pretrained", "base_model.path": "/some/model"})
    assert r.r1_zero.grpo.max_completion_length == 64
    # a built base model keeps the tiny defaults
    assert load_recipe(path, {"base_model.source": "build"}).distill.students[0].name == "student-96"
