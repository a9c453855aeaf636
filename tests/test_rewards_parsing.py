"""rewards.parsing and rewards.format: extraction rules and the R1 template check, including hostile inputs."""

import time

import pytest

from rewards.format import format_reward, soft_format_reward
from rewards.parsing import extract_answer, extract_boxed, extract_think, is_r1_format, ordered_tag_count, shorten

GOOD = "<think>7+8=15, write 5 carry 1. 3+4+1=8, write 8. so the answer is 85.</think><answer>85</answer>"


def test_clean_trace():
    assert extract_think(GOOD) == "7+8=15, write 5 carry 1. 3+4+1=8, write 8. so the answer is 85."
    assert extract_answer(GOOD) == "85"
    assert is_r1_format(GOOD) and is_r1_format(" " + GOOD + "\n")
    assert is_r1_format("<think>a</think>\n\n<answer> 85 </answer>")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>a</think><answer>84</answer><answer>85</answer>", None),  # two answer blocks: no hedging
        ("<think>a</think> 85", None),  # answer outside the tags
        ("so the answer is 85. 85", None),
        ("<think>a</think><answer>85", None),  # unclosed
        ("<think>a</think><answer><answer>85</answer></answer>", None),  # nested
        ("<think>a</think><answer><think>85</answer>", None),  # a tag inside the answer
        ("<think><answer>84</answer></think><answer>85</answer>", "85"),  # answer-looking text inside think ignored
        ("<think></think><answer>85</answer>", "85"),  # empty think still has an answer
        ("<think>a</think><answer>\\boxed{85}</answer>", "\\boxed{85}"),
        ("<think>a</think><answer>写 85 ✓</answer>", "写 85 ✓"),
    ],
)
def test_tag_answer_rules(text, answer):
    assert extract_answer(text) == answer


def test_boxed_mode_and_auto():
    assert extract_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed(r"\boxed{1} and \boxed{2") is None  # the final box was cut off
    assert extract_answer(r"the answer is \boxed{42}") == "42"  # auto: no <answer> tag -> boxed
    assert extract_answer(r"<answer>7</answer> \boxed{42}", mode="boxed") == "42"
    assert extract_answer(r"the answer is \boxed{42}", mode="tag") is None
    with pytest.raises(ValueError, match="unknown answer mode 'last'"):
        extract_answer("x", mode="last")


def test_think_rules():
    assert extract_think("no tags at all") is None
    assert extract_think("<think>unclosed <answer>85</answer>") == "unclosed "
    assert extract_think("<think>cut off") == "cut off"
    assert extract_think("<think><think>x</think>") == "<think>x"


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>1</answer><answer>2</answer>",
        "<think>a</think><think>b</think><answer>1</answer>",
        "<think>a</think>junk<answer>1</answer>",
        "junk<think>a</think><answer>1</answer>",
        "<think>a</think><answer>1</answer>junk",
        "<think>a<think>b</think><answer>1</answer>",
        "<think>a</think><answer>1</think></answer>",
        "<think>a</think><answer>1",
        "<answer>1</answer><think>a</think>",
        "<think>a</think>",
        "<think>a</think><answer></answer",
        "",
    ],
)
def test_strict_format_rejects(text):
    assert not is_r1_format(text)
    assert format_reward([""], [text]) == [0.0]


def test_soft_format_hand_checked():
    cases = {
        GOOD: 1.0,
        "<think>a</think><answer>85": 0.75,  # cut off before </answer>
        "<think>a</think> 85": 0.5,
        "a</think><answer>85</answer>": 0.75,
        "<answer>85</answer><think>a</think>": 0.5,  # wrong order: only an in-order pair counts
        "<think><think><think></think>": 0.5,  # repeating a tag earns nothing
        "plain text 85": 0.0,
        "junk<think>a</think>junk<answer>85</answer>junk": 1.0,  # soft: surrounding text is not checked
    }
    assert soft_format_reward([""] * len(cases), list(cases)) == list(cases.values())
    assert format_reward([""] * 2, [GOOD, "<think>a</think> 85"], answer=["85", "85"], unknown_column=[1, 2]) == [
        1.0,
        0.0,
    ]


def test_ordered_tag_count_is_longest_in_order_subsequence():
    # greedy matching of <think> first would find only 1; skipping the stray <think> finds 3
    assert ordered_tag_count("</think><answer></answer><think>") == 3


def test_hostile_huge_inputs_are_linear():
    huge = [
        "<think>" + "a" * 1_000_000 + "</think><answer>1</answer>",
        "<think>" * 200_000,
        "<answer>" * 120_000 + "</answer>",
        "\\boxed{" * 140_000,
        "{" * 500_000 + "\\boxed{" + "{" * 500_000,
        "</think>" * 130_000 + "<answer>x",
        "<think>" + "<answer>1</answer>" * 60_000 + "</think>",
    ]
    t = time.process_time()
    for text in huge:
        extract_think(text), extract_answer(text), extract_answer(text, "boxed"), is_r1_format(text)
        format_reward([""], [text]), soft_format_reward([""], [text])
    assert time.process_time() - t < 1.0


def test_shorten():
    assert shorten("abc") == "abc"
    s = shorten("x" * 1000, 20)
    assert len(s) < 60 and s.startswith("x" * 10) and "[980 chars]" in s
