"""Length shaping: DAPO's soft overlong penalty, open-r1's cosine length scaling, an n-gram repetition penalty.

Lengths are characters of the completion by default; pass `tokenizer` (anything with `__call__(texts)` returning
`input_ids`, e.g. a Hugging Face tokenizer) to count tokens instead, which is what DAPO's L_max means.
"""

from __future__ import annotations

import math

from rewards.accuracy import is_correct


def completion_lengths(completions: list[str], tokenizer=None) -> list[int]:
    """Characters per completion, or tokens (no special tokens added) when a tokenizer is given."""
    if tokenizer is None:
        return [len(c) for c in completions]
    return [len(ids) for ids in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO eq. 13: 0 up to L_max - L_cache, then linear down to -1 at L_max, -1 beyond."""
    soft_start = max_length - cache_length
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache_length
    return -1.0


def overlong_reward(
    prompts: list[str],
    completions: list[str],
    max_length: int = 4096,
    cache_length: int = 512,
    tokenizer=None,
    **kwargs,
) -> list[float]:
    """DAPO's soft overlong punishment per completion (0 .. -1); lengths as in `completion_lengths`."""
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"need 0 < cache_length <= max_length (got cache_length={cache_length}, max_length={max_length})"
        )
    return [overlong_penalty(n, max_length, cache_length) for n in completion_lengths(completions, tokenizer)]


def cosine_scaled(
    length: int,
    correct: bool,
    max_length: int,
    min_value_wrong: float,
    max_value_wrong: float,
    min_value_correct: float,
    max_value_correct: float,
) -> float:
    """open-r1's cosine schedule: at length 0 a correct answer gets max_value_correct and a wrong one min_value_wrong;
    at max_length (and beyond: progress is clipped) they reach min_value_correct and max_value_wrong."""
    progress = min(max(length / max_length, 0.0), 1.0)
    cosine = math.cos(progress * math.pi)
    if correct:
        lo, hi = min_value_correct, max_value_correct
    else:  # swapped: for a wrong answer the value rises with length (longer is less bad)
        lo, hi = max_value_wrong, min_value_wrong
    return lo + 0.5 * (hi - lo) * (1.0 + cosine)


def cosine_length_reward(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    max_length: int = 1000,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    tokenizer=None,
    **columns,
) -> list[float]:
    """Correct answers: shorter is better (1.0 -> 0.5); wrong ones: longer is less bad (-1.0 -> -0.5). Correctness as
    in `accuracy_reward` (`task`, `metadata` and accuracy options pass through `columns`)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0 (got {max_length})")
    correct = is_correct(completions, answer, **columns)
    return [
        cosine_scaled(n, ok, max_length, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
        for n, ok in zip(completion_lengths(completions, tokenizer), correct)
    ]


def repeated_ngram_share(text: str, ngram_size: int = 3) -> float:
    """1 - distinct n-grams / all n-grams, over lower-cased whitespace-separated words; 0 for fewer than n words."""
    words = text.lower().split()
    total = len(words) - ngram_size + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(words[i : i + ngram_size]) for i in range(total)})
    return 1.0 - distinct / total


def repetition_penalty_reward(
    prompts: list[str],
    completions: list[str],
    ngram_size: int = 3,
    max_penalty: float = -1.0,
    **kwargs,
) -> list[float]:
    """Share of repeated word n-grams in the completion times `max_penalty` (<= 0): 0 for no repetition."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0 (got {max_penalty})")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1 (got {ngram_size})")
    return [repeated_ngram_share(c, ngram_size) * max_penalty for c in completions]
