"""rewards.registry: specs -> bound reward functions, failures named; call_reward's checks and error reports."""

import math

import pytest
from pydantic import ValidationError

from rewards import REGISTRY, RewardError, RewardSpec, build_rewards, call_reward, is_process_reward

GOOD = "<think>7+8=15, write 5 carry 1. 3+4+1=8, write 8. so the answer is 85.</think><answer>85</answer>"
MIXED = "<think>7+8=15, 写 5 进位 1. 所以 答案 是 85.</think><answer>84</answer>"


def test_known_names():
    assert set(REGISTRY) == {
        "accuracy",
        "format",
        "soft_format",
        "language_consistency",
        "overlong",
        "cosine_length",
        "repetition",
        "reward_model",
        "process_arithmetic",
        "code_tests",
    }


def test_round_trip_from_dicts():
    raw = [
        {"name": "accuracy"},
        {"name": "format", "weight": 0.5},
        {"name": "language_consistency", "weight": 0.1, "params": {"target_language": "en"}},
        {"name": "overlong", "params": {"max_length": 100, "cache_length": 20}},
        {"name": "repetition", "weight": 0.2, "params": {"ngram_size": 2, "max_penalty": -0.5}},
        {"name": "cosine_length", "params": {"max_length": 500}},
        {"name": "soft_format"},
        {"name": "process_arithmetic", "params": {"neutral": 0.0}},
    ]
    specs = [RewardSpec.model_validate(r) for r in raw]
    assert [RewardSpec.model_validate(s.model_dump()) for s in specs] == specs  # dict -> spec -> dict -> spec
    built = build_rewards(raw)
    assert [(n, w) for n, _, w in built] == [(r["name"], r.get("weight", 1.0)) for r in raw]
    cols = {"answer": ["85", "85"], "task": ["addition"] * 2, "metadata": ["{}"] * 2, "prompt_id": ["p0", "p0"]}
    scores = {n: call_reward(n, fn, ["User: 7+8\nAssistant:"] * 2, [GOOD, MIXED], **cols) for n, fn, _ in built}
    assert scores["accuracy"] == [1.0, 0.0]
    assert scores["format"] == [1.0, 1.0]
    assert scores["language_consistency"] == [1.0, 0.0]  # MIXED: every word of the think block is Chinese
    assert len(GOOD) == 97 and scores["overlong"][0] == pytest.approx((80 - 97) / 20)  # in the soft zone 80..100
    assert scores["soft_format"] == [1.0, 1.0]
    assert [r for _, r in scores["process_arithmetic"][0]] == [1.0, 1.0, 0.0, 1.0]
    assert is_process_reward(built[-1][1]) and not is_process_reward(built[0][1])


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy'.*'accuracy'.*'format'"):
        build_rewards([{"name": "acuracy"}])


def test_unknown_param_is_named():
    with pytest.raises(ValueError, match=r"unknown param 'max_len'.*known params"):
        build_rewards([{"name": "overlong", "params": {"max_len": 10}}])
    with pytest.raises(ValueError, match="unknown param 'answer'"):  # a column, not a param
        build_rewards([{"name": "accuracy", "params": {"answer": ["1"]}}])
    with pytest.raises(ValueError, match="'xx'"):
        build_rewards([{"name": "language_consistency", "params": {"target_language": "xx"}}])
    with pytest.raises(ValueError, match="unknown param 'pth'"):
        build_rewards([{"name": "reward_model", "params": {"pth": "x"}}])
    with pytest.raises(ValidationError, match="wieght"):
        build_rewards([{"name": "format", "wieght": 2}])


def test_raising_reward_names_itself_and_the_sample():
    def picky(prompts, completions, **kw):
        return [1 / 0 if "BOOM" in c else 1.0 for c in completions]

    comps = ["fine", "fine too", "x" * 500 + "BOOM" + "y" * 500, "fine"]
    with pytest.raises(RewardError) as err:
        call_reward("picky", picky, ["p0", "p1", "p2", "p3"], comps, answer=["1"] * 4)
    e = err.value
    assert e.name == "picky" and e.index == 2 and e.prompt == "p2"
    msg = str(e)
    assert "'picky'" in msg and "ZeroDivisionError" in msg and "sample 2" in msg and "'p2'" in msg
    assert "chars]" in msg and len(msg) < 800  # the completion is shortened
    assert isinstance(e.__cause__, ZeroDivisionError)


def test_batch_level_failure_still_named():
    def needs_answer(prompts, completions, answer, **kw):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="'needs_answer'.*TypeError"):
        call_reward("needs_answer", needs_answer, ["p"], ["c"])


@pytest.mark.parametrize(
    "value, match",
    [
        ([1.0], "1 values for 2"),
        ([1.0, math.nan], r"sample 1.*|nan"),
        ([1.0, None], "None"),
        ([1.0, "1"], "not a float"),
        ([1.0, math.inf], "finite"),
        (None, "NoneType"),
    ],
)
def test_output_validation(value, match):
    with pytest.raises(RewardError, match=match):
        call_reward("bad", lambda p, c, **k: value, ["p", "q"], ["a", "b"])


def test_process_output_validation_and_columns():
    ok = lambda p, c, **k: [[(1, 0.5)] for _ in c]
    ok.process = True
    assert call_reward("ok", ok, ["p"], ["abc"]) == [[(1, 0.5)]]
    bad = lambda p, c, **k: [[(5, 0.5)] for _ in c]
    bad.process = True
    with pytest.raises(RewardError, match=r"step end 5 .*\[0, 3\]"):
        call_reward("bad", bad, ["p"], ["abc"])
    with pytest.raises(RewardError, match="column 'answer'"):
        call_reward("ok", ok, ["p"], ["abc"], answer=["1", "2"])


def test_weight_must_be_finite():
    with pytest.raises(ValidationError, match="weight"):
        RewardSpec(name="format", weight=float("nan"))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "overlong", "params": {"max_length": "abc"}}, "'overlong', param 'max_length'"),
        ({"name": "overlong", "params": {"max_length": 10, "cache_length": 20}}, "'overlong'.*cache_length"),
        ({"name": "accuracy", "params": {"answer_mode": "last"}}, "'answer_mode'.*'auto', 'tag' or 'boxed'"),
        ({"name": "accuracy", "params": {"math_verify_timeout": 0}}, "'accuracy'.*math_verify_timeout"),
        ({"name": "repetition", "params": {"max_penalty": 1}}, "'repetition'.*max_penalty"),
        ({"name": "process_arithmetic", "params": {"delimiters": [".", ""]}}, "'process_arithmetic'.*delimiters"),
    ],
)
def test_bad_values_fail_at_build_time_naming_the_param(spec, match):
    with pytest.raises(ValueError, match=match):
        build_rewards([spec])
