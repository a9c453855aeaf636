"""rewards.process: steps, arithmetic claims, (end offset, reward) pairs whose offsets land exactly on step ends."""

import random
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rewards.process import arithmetic_claims, completion_steps, process_arithmetic_reward, split_steps
from stages.core.tasks import TraceNoise, make_problems, noisy_trace

GOOD = " <think>7+8=15, write 5 carry 1. 3+4+1=8, write 8. so the answer is 85.</think><answer>85</answer>"
BAD = "<think>7+8=16, write 6 carry 1. 3+4+1=8, write 8. so the answer is 86.</think><answer>86</answer>"


def test_hand_checked_rewards_and_offsets():
    (good,) = process_arithmetic_reward([""], [GOOD], answer=["85"])
    steps = ["7+8=15, write 5 carry 1.", "3+4+1=8, write 8.", "so the answer is 85.", "</think><answer>85</answer>"]
    assert [r for _, r in good] == [1.0, 1.0, 0.5, 1.0]
    for (end, _), step in zip(good, steps):
        assert GOOD[:end].endswith(step)
    assert good[-1][0] == len(GOOD)
    (bad,) = process_arithmetic_reward([""], [BAD], answer=["85"])
    assert [r for _, r in bad] == [0.0, 1.0, 0.5, 0.0]
    (no_answer,) = process_arithmetic_reward([""], [BAD], neutral=0.25)
    assert [r for _, r in no_answer] == [0.0, 1.0, 0.25, 0.25]  # without a gold answer the final step is neutral


def test_claims():
    assert arithmetic_claims("7+8=15, write 5 carry 1") == [(3, True)]
    assert arithmetic_claims("write 5 carry 1 3+4+1=8") == [(21, True)]
    assert arithmetic_claims("12 + 30 = 42 and 1+1=3") == [(8, True), (20, False)]
    assert arithmetic_claims("x=5, 8=8, +=1, 1+=2, ²+1=3, 1+1=٢") == []  # no computation / non-ASCII digits
    assert arithmetic_claims("1+2=3=4") == [(3, True)]


@pytest.mark.parametrize("text, right", [
    ("2*3+4=10", True), ("10-3+4=11", True), ("2^3+1=9", True), ("(2+3)*4=20", True), ("2**3=8", True),
    ("-2^2=-4", True), ("1/4=0.25", True), ("1/3=0.333", True),
    ("3+4=7.5", False), ("2*3+4=14", False), ("10-3+4=3", False), ("2^3+1=7", False), ("1/3=0.334", False),
])
def test_whole_expressions_are_judged(text, right):
    assert arithmetic_claims(text) == [(text.index("="), right)]


@pytest.mark.parametrize("text", ["1,234+1=1,235", "1.2.3+1=4", "2+2=3,5", "5/0=1", "9^9^9=1", "2^0.5=1.41",
                                  "1+" * 60 + "1=61"])
def test_partial_numbers_and_what_cannot_be_judged_are_neutral(text):
    assert arithmetic_claims(text) == []


@st.composite
def expressions(draw, depth=3):
    """A random expression over small integers with + - * ^ and parentheses."""
    if depth == 0 or draw(st.booleans()):
        return str(draw(st.integers(0, 999)))
    a, b = draw(expressions(depth=depth - 1)), draw(expressions(depth=depth - 1))
    op = draw(st.sampled_from(["+", "-", "*", "^"]))
    if op == "^":
        return f"({a})^{draw(st.integers(0, 3))}"
    return f"({a}){op}({b})" if draw(st.booleans()) else f"{a} {op} {b}"


def _value(text):
    return eval(text.replace("^", "**"))  # the reference: Python's own precedence on small integers


@settings(max_examples=300, deadline=None)
@given(expressions(), st.integers(1, 9), st.sampled_from(["", "so ", "x: "]))
def test_claims_of_random_expressions(text, off, prefix):
    value = _value(text)
    assume(abs(value) < 10**30)
    right, wrong = f"{prefix}{text} = {value}", f"{prefix}{text} = {value + off}"
    if not any(op in text.lstrip("-")[1:] for op in "+-*^"):
        return  # a bare number claims no computation
    assert arithmetic_claims(right) == [(right.index("="), True)]
    assert arithmetic_claims(wrong) == [(wrong.index("="), False)]
    assert arithmetic_claims(f"{right}.5") == [(right.index("="), False)]  # never a partial number: value.5 != value


def test_configurable_delimiters_and_offsets_on_noisy_traces():
    text = "<think>line one 1+1=2\nline two 2+2=5\n\nline three</think><answer>x</answer>"
    (out,) = process_arithmetic_reward([""], [text], delimiters=["\n"])
    assert [r for _, r in out] == [1.0, 0.0, 0.5, 0.5]
    for (e, _), step in zip(out, ["line one 1+1=2", "line two 2+2=5", "line three"]):
        assert text[:e].endswith(step)
    rng = random.Random(0)
    probs = make_problems("addition", 200, seed=5)
    comps = [noisy_trace(p, rng, TraceNoise()) for p in probs]
    outs = process_arithmetic_reward([""] * 200, comps, answer=[p.answer for p in probs])
    for c, steps in zip(comps, outs):
        ends = [e for e, _ in steps]
        assert ends == sorted(ends) and 0 < ends[0] and ends[-1] <= len(c)
        assert all(not c[e - 1].isspace() for e in ends)  # a step never ends on whitespace
        assert all(r in (0.0, 0.5, 1.0) for _, r in steps)


def test_claims_in_one_step_agree_with_per_step_checking():
    (out,) = process_arithmetic_reward([""], ["<think>2+3=5+1=6. 1+1=3 and 2+2=4.</think>"])
    assert [r for _, r in out] == [1.0, 0.0, 0.5]


def test_split_steps():
    t = "a. b.\nc. "
    assert [t[a:b] for a, b in split_steps(t)] == ["a.", "b.", "c."]
    assert [t[a:b] for a, b in split_steps(t, ["\n"])] == ["a. b.", "c."]
    assert completion_steps("no think. two steps") == [(0, 9), (10, 19)]
    t = "a. b. c. d. e"
    assert [t[a:b] for a, b in split_steps(t, max_steps=3)] == ["a.", "b.", "c. d. e"]


def test_hostile_and_huge():
    huge = [
        "<think>" + "1+" * 500_000 + "</think>",  # a sum that never ends in '='
        "<think>" + "1+1=2 " * 170_000 + "</think>",
        "<think>" + "=" * 1_000_000 + "</think>",
        "<think>" + "9" * 1_000_000 + "+1=1</think>",  # a huge number is not a claim
        "<think>" + ". " * 500_000 + "</think>",
        "<think>数字 1+1=2。写 ² 进位\u0000 .\n" * 30_000,
        "<think>" + "\n" * 1_000_000 + "</think>",
        "<think>a" + " " * 1_000_000 + "b</think>",
        "<think>" + ".\n \n" * 250_000 + "</think>",
    ]
    for c in huge:
        t = time.process_time()  # CPU time: other jobs on the shared cores do not count
        (steps,) = process_arithmetic_reward([""], [c])
        assert time.process_time() - t < 1.0, c[:20]
        assert steps and steps[-1][0] <= len(c) and len(steps) <= 513  # max_steps 512 + the final step
