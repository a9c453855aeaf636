"""grpo.rewards_io: the one way rewards are called (training, tests, benchmarks): output checks, the failing sample
found by bisection, and which rewards fit which advantage mode."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.rewards_io import (
    RewardError,
    call_reward,
    char_offsets_to_token_ends,
    check_reward_funcs,
    decoded_prefix_lengths,
)


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


def test_a_column_may_share_a_name_with_call_rewards_parameters():
    def echo(prompts, completions, name, fn, **kw):
        return [float(len(n) + len(f)) for n, f in zip(name, fn)]

    assert call_reward("echo", echo, ["p", "q"], ["a", "b"], name=["ab", "c"], fn=["x", ""]) == [3.0, 1.0]


def _outcome(prompts, completions, **kw):
    return [1.0] * len(completions)


def _steps(prompts, completions, **kw):
    return [[(len(c), 1.0)] for c in completions]


_steps.process = True


def test_rewards_must_fit_the_advantage_mode():
    check_reward_funcs([("o", _outcome, 1.0)], "outcome")
    check_reward_funcs([("s", _steps, 1.0), ("o", _outcome, 0.5)], "process")  # outcome joins as the final step
    with pytest.raises(ValueError, match=r"'outcome' cannot use process rewards.*\['s'\]"):
        check_reward_funcs([("o", _outcome, 1.0), ("s", _steps, 1.0)], "outcome")
    with pytest.raises(ValueError, match=r"'process' needs at least one process reward.*\['o'\]"):
        check_reward_funcs([("o", _outcome, 1.0)], "process")


@pytest.mark.parametrize("mode, rewards, match", [
    ("outcome", [{"name": "accuracy"}, {"name": "process_arithmetic"}],
     r"r1_zero\.rewards: advantage_mode 'outcome' cannot use process rewards .*\['process_arithmetic'\]"),
    ("process", [{"name": "accuracy"}, {"name": "format"}],
     r"r1_zero\.rewards: advantage_mode 'process' needs at least one process reward"),
])
def test_preflight_refuses_rewards_that_do_not_fit_the_mode(mode, rewards, match):
    from stages.core.preflight import check_rewards
    from stages.core.recipe import load_recipe

    recipe = load_recipe("tiny", {"r1_zero.grpo.advantage_mode": mode, "r1_zero.rewards": rewards})
    [problem] = check_rewards(recipe, ["r1_zero"])
    assert re.search(match, problem), problem
    fixed = load_recipe("tiny", {"r1_zero.grpo.advantage_mode": "process" if mode == "outcome" else "outcome",
                                 "r1_zero.rewards": rewards})
    assert check_rewards(fixed, ["r1_zero"]) == []


def quadratic_prefix_lengths(tokenizer, ids):
    """The reference: decode every prefix (what char_offsets_to_token_ends did before it was made linear)."""
    prefixes = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
    return [len(t.rstrip("\ufffd")) for t in prefixes]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_incremental_decoding_matches_decoding_every_prefix(tok, data):
    text_ids = tok("<think>12+34=46, 所以 答案 是 46.</think> é\n\n", add_special_tokens=False)["input_ids"]
    pool = st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(text_ids + [tok.eos_token_id, tok.pad_token_id]))
    ids = data.draw(st.lists(pool, max_size=40))
    assert decoded_prefix_lengths(tok, ids) == quadratic_prefix_lengths(tok, ids)


def test_long_completion_maps_in_linear_time(tok):
    ids = tok("<think>12+34=46, write 6 carry 1. 所以 答案 是 46.</think>\n" * 400, add_special_tokens=False)["input_ids"]
    ids = (ids * (16_384 // len(ids) + 1))[:16_384]
    text = tok.decode(ids, skip_special_tokens=True)
    ends = char_offsets_to_token_ends(tok, torch.tensor(ids), len(ids), [1, len(text) // 2, len(text)])
    assert ends[-1] == len(ids) - 1 and 0 <= ends[0] < ends[1] < ends[2]
    assert len(tok.decode(ids[: ends[1] + 1], skip_special_tokens=True)) >= len(text) // 2
    assert len(tok.decode(ids[: ends[1]], skip_special_tokens=True).rstrip("\ufffd")) < len(text) // 2
