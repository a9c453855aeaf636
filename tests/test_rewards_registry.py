"""rewards.registry: specs -> bound reward functions (with their process flag), failures named."""

import pytest
from pydantic import ValidationError

from grpo.rewards_io import call_reward, is_process_reward
from rewards import REGISTRY, RewardSpec, build_rewards

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
