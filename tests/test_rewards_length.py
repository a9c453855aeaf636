"""rewards.length: DAPO overlong penalty, cosine length scaling, repetition penalty; hand-checked values."""

import math
import time

import pytest

from rewards.length import cosine_length_reward, overlong_reward, repeated_ngram_share, repetition_penalty_reward


def of_len(n: int, ans: str = "85") -> str:
    """A completion of exactly n characters answering `ans`."""
    base = f"<think></think><answer>{ans}</answer>"
    return base.replace("<think>", "<think>" + "x" * (n - len(base)))


def test_overlong_hand_checked():
    comps = [of_len(n) for n in (50, 80, 90, 95, 100, 101, 500)]
    assert [len(c) for c in comps] == [50, 80, 90, 95, 100, 101, 500]
    out = overlong_reward([""] * 7, comps, max_length=100, cache_length=20)
    assert out == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0, -1.0]


def test_overlong_counts_tokens_with_a_tokenizer():
    class WordTokenizer:  # one token per whitespace-separated word
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    comps = [" ".join(["w"] * n) for n in (8, 9, 10, 11)]
    out = overlong_reward([""] * 4, comps, max_length=10, cache_length=4, tokenizer=WordTokenizer())
    assert out == [-0.5, -0.75, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_length"):
        overlong_reward([""], ["x"], max_length=10, cache_length=11)


def test_cosine_hand_checked():
    comps = [of_len(n, a) for n in (40, 50, 100, 200) for a in ("85", "84")]
    out = cosine_length_reward([""] * 8, comps, answer=["85"] * 8, max_length=100)
    # correct: 0.5 + 0.25 (1 + cos(pi L/100)); wrong: -0.5 - 0.25 (1 + cos(pi L/100)); clipped at L = 100
    c40 = 1 + math.cos(0.4 * math.pi)
    assert [len(c) for c in comps[::2]] == [40, 50, 100, 200]
    expected = [0.5 + 0.25 * c40, -0.5 - 0.25 * c40, 0.75, -0.75, 0.5, -0.5, 0.5, -0.5]
    assert out == pytest.approx(expected)
    assert out[0] > out[2] > out[4]  # correct: shorter is better
    assert out[1] < out[3] < out[5]  # wrong: longer is less bad


def test_cosine_custom_values_and_extra_columns():
    out = cosine_length_reward(
        ["", ""],
        [of_len(40), of_len(40, "1")],
        answer=["85", "85"],
        max_length=80,
        min_value_correct=0.0,
        max_value_correct=2.0,
        min_value_wrong=-2.0,
        max_value_wrong=0.0,
        task=["addition"] * 2,
        prompt_id=["a", "a"],
    )
    assert out == pytest.approx([1.0, -1.0])  # halfway: the middle of each range


def test_repetition_hand_checked():
    assert repeated_ngram_share("a b c a b c", 3) == pytest.approx(0.25)  # abc bca cab abc: 3 distinct of 4
    assert repeated_ngram_share("one two", 3) == 0.0
    out = repetition_penalty_reward(
        ["", "", ""], ["a b c a b c", "a b c d e f", "x x x x x x"], ngram_size=3, max_penalty=-0.5
    )
    assert out == pytest.approx([-0.125, 0.0, -0.5 * 3 / 4])
    with pytest.raises(ValueError, match="max_penalty"):
        repetition_penalty_reward([""], ["x"], max_penalty=1.0)


def test_huge_completion_is_fast():
    huge = of_len(1_000_000)
    t = time.process_time()
    overlong_reward([""], [huge]), cosine_length_reward([""], [huge], answer=["85"])
    repetition_penalty_reward([""], ["the same words again " * 50_000])
    assert time.process_time() - t < 1.0
