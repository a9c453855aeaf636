"""`r1 validate` and the CLI under bad input: random mutations of recipes and `--set` values never raise anything but
the tool's own error, never hang, and never let a non-finite number through; the CLI prints messages, not tracebacks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.cli import app
from stages.core.recipe import PRESET_DIR, RecipeError, flatten, load_recipe, parse_sets

ROOT = Path(__file__).resolve().parents[1]
TINY = (PRESET_DIR / "tiny.yaml").read_text()
KEYS = sorted(flatten(load_recipe("tiny")))  # every leaf of the recipe, dotted (also imports the cron checker once)

BAD_VALUES = [".nan", ".inf", "-.inf", "nan", "1e400", "1e9", "1000000000000", "-1", "0", "true", "false", "null",
              "'x'", "[1, 2]", "{a: 1}", "[1", "{a:", "&a [1]", "*a", "a: b: c", "\x00", "'" + "y" * 5000 + "'",
              "~", "2.5", "1e-3", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"]


def _non_finite(node) -> bool:
    if isinstance(node, float):
        return not math.isfinite(node)
    if isinstance(node, dict):
        return any(_non_finite(v) for v in node.values())
    if isinstance(node, list | tuple):
        return any(_non_finite(v) for v in node)
    return False


def _validate(path: Path, sets: list[str]):
    """What `r1 validate` runs (flows.cli._recipe): the recipe's own error is the only acceptable failure."""
    start = time.monotonic()
    try:
        recipe = load_recipe(path, parse_sets(sets))
    except RecipeError as e:
        assert len(str(e)) < 20_000, "a message echoes a huge value"
        recipe = None
    assert time.monotonic() - start < 5, "validation took too long"
    if recipe is not None:
        assert not _non_finite(recipe.model_dump()), "a non-finite number was accepted"
    return recipe


def _mutated_text(draw) -> str | bytes:
    kind = draw(st.sampled_from(["truncate", "duplicate", "binary", "misspell", "value", "same"]))
    if kind == "truncate":
        return TINY[: draw(st.integers(0, len(TINY)))]
    if kind == "duplicate":
        line = draw(st.sampled_from([ln for ln in TINY.splitlines() if ln and not ln[0].isspace() and ":" in ln]))
        return TINY + "\n" + line + "\n"
    if kind == "binary":
        at = draw(st.integers(0, len(TINY)))
        return TINY.encode()[:at] + draw(st.binary(min_size=1, max_size=8)) + TINY.encode()[at:]
    if kind == "misspell":
        words = [w for w in TINY.split() if w.endswith(":") and len(w) > 3]
        w = draw(st.sampled_from(words))
        return TINY.replace(w, w[:-2] + w[-1], 1)  # drop a letter of one key
    if kind == "value":
        lines = TINY.splitlines()
        i = draw(st.sampled_from([i for i, ln in enumerate(lines) if ": " in ln and not ln.strip().startswith("#")]))
        key = lines[i].split(": ", 1)[0]
        lines[i] = f"{key}: {draw(st.sampled_from(BAD_VALUES))}"
        return "\n".join(lines)
    return TINY


@st.composite
def cases(draw):
    text = _mutated_text(draw)
    sets = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()):
            key = draw(st.sampled_from([key + "x", key.replace(".", "..", 1), "." + key, key.upper()]))
        value = draw(st.one_of(st.sampled_from(BAD_VALUES), st.text(max_size=20)))
        sets.append(f"{key}={value}")
    return text, sets


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_random_bad_recipes_are_refused_cleanly(tmp_path, case):
    text, sets = case
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _validate(path, sets)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400"])
@pytest.mark.parametrize("key", ["r1_zero.grpo.beta", "r1_zero.grpo.temperature", "eval.temperature",
                                 "cold_start_sft.sft.learning_rate", "r1_zero.grpo.max_grad_norm",
                                 "r1_zero.rewards.0.weight", "preference_rl.grpo.vllm.gpu_memory_utilization"])
def test_non_finite_numbers_are_refused_naming_the_override(key, value):
    sets = [f"{key}={value}"] if "rewards" not in key else [f"r1_zero.rewards=[{{name: accuracy, weight: {value}}}]"]
    with pytest.raises(RecipeError, match=r"--set r1_zero\.rewards=|--set " + key.replace(".", r"\.")) as e:
        load_recipe("tiny", parse_sets(sets))
    assert "finite" in str(e.value)


def test_yaml_numbers_keep_working():
    cfg = load_recipe("tiny", parse_sets(["r1_zero.grpo.learning_rate=1e-3", "eval.temperature=1",
                                          "r1_zero.grpo.beta=0"]))
    assert cfg.r1_zero.grpo.learning_rate == 0.001 and cfg.eval.temperature == 1.0 and cfg.r1_zero.grpo.beta == 0.0


def test_home_is_expanded_once(tmp_path):
    cfg = load_recipe("tiny", {"output_dir": "~/r1-out", "r1_zero.data": {"source": "path", "path": "~/d.jsonl"}})
    assert cfg.output_dir == os.path.expanduser("~/r1-out") and not cfg.output_dir.startswith("~")
    assert cfg.r1_zero.data.path == os.path.expanduser("~/d.jsonl")


def test_value_echo_is_cut():
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny", {"eval.num_prompts": "x" * 10_000_000})
    assert len(str(e.value)) < 1000 and "10,000,002 chars" in str(e.value)


def test_alias_bomb_is_refused_at_once(tmp_path):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                                                    for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    (tmp_path / "bomb.yaml").write_text("\n".join(rows))  # 9**9 leaves if expanded
    start = time.monotonic()
    with pytest.raises(RecipeError, match="anchors and aliases"):
        load_recipe(tmp_path / "bomb.yaml")
    assert time.monotonic() - start < 1


def test_cli_message_is_markup_safe_and_exits_2():
    res = CliRunner().invoke(app, ["validate", "tiny", "--set", "name=x[bold]y[/bold]"])
    assert res.exit_code == 2 and "x[bold]y[/bold]" in res.output and "Traceback" not in res.output


def test_cli_unexpected_error_writes_its_traceback(tmp_path, monkeypatch):
    import stages.core.recipe

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages.core.recipe, "load_recipe", boom)
    res = CliRunner().invoke(app, ["validate", "tiny"])
    assert res.exit_code == 1 and "unexpected error: ZeroDivisionError: a bug" in res.output
    log = next((tmp_path / ".r1" / "logs").glob("error-*.txt"))
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    debug = CliRunner().invoke(app, ["--debug", "validate", "tiny"])
    assert isinstance(debug.exception, ZeroDivisionError)


def test_refused_run_id_leaves_no_mlflow_run_and_no_work_folder(tmp_path):
    import mlflow

    from stages.core.preflight import PreflightError
    from stages.registry import runnable

    cfg = load_recipe("tiny", {"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / "runs")})
    with pytest.raises(PreflightError, match="no such run"):
        runnable()["r1_zero"](cfg, inputs={"model": "f" * 32}, progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_experiment_by_name(cfg.tracking.experiment) is None
    assert not (tmp_path / "runs" / "r1_zero").exists()


def test_load_model_refuses_missing_weights(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    from stages.core.models import ModelInputError, load_model
    from tests.conftest import build_tiny_model

    build_tiny_model(tok).save_pretrained(tmp_path)
    load_model(tmp_path)  # complete: loads
    weights = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if "layers.0.mlp" in k))
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelInputError, match="weights are not in its safetensors files"):
        load_model(tmp_path)


@pytest.mark.parametrize("args, expect", [
    (["validate", "{recipe}"], "duplicate key 'seed'"),
    (["validate", "tiny", "--set", "r1_zero.grpo.beta=.nan"], "--set r1_zero.grpo.beta=nan"),
])
def test_real_cli_prints_a_message_not_a_traceback(tmp_path, args, expect):
    (tmp_path / "r.yaml").write_text("seed: 1\nseed: 2\n")
    args = [a.replace("{recipe}", str(tmp_path / "r.yaml")) for a in args]
    res = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args], capture_output=True,
                         check=False, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = res.stdout + res.stderr
    assert res.returncode == 2 and expect in " ".join(out.split()) and "Traceback" not in out, out
