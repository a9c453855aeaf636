"""Process rewards: one reward per reasoning step, as (step end offset, reward) pairs per completion.

The offset is the exclusive end, in characters, of the step inside the completion string (`completion[:end]` ends with
the step); the GRPO engine maps characters to tokens. Steps are the think block split after each delimiter (default: a
sentence end ". " or a newline; the step keeps its period, the whitespace after it goes to the next step). Without a
think block the whole completion is split. What follows the last step (the answer block) forms a final step ending at
`len(completion)`, rewarded 1/0 for the final answer when the row has an `answer`, else with the neutral value, so
that every token is covered by some step.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence

from rewards.accuracy import is_correct
from rewards.parsing import think_span

DEFAULT_DELIMITERS = (". ", "\n")
DEFAULT_MAX_STEPS = 512
_MAX_DIGITS = 100  # longer numbers are not arithmetic claims (and int() of huge digit strings is slow or refused)


def split_steps(
    text: str,
    delimiters: Sequence[str] = DEFAULT_DELIMITERS,
    start: int = 0,
    end: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> list[tuple[int, int]]:
    """(start, end) of each non-blank step of text[start:end], split after each delimiter; outer whitespace trimmed.
    After `max_steps - 1` cuts the rest is one last step (bounds the work and the output on degenerate text)."""
    if not delimiters or any(not d for d in delimiters):
        raise ValueError(f"delimiters must be non-empty strings (got {delimiters!r})")
    end = len(text) if end is None else end
    # a delimiter and the whitespace after it are one match, so a run of blank lines is one cut, not a million
    pattern = re.compile("(?:" + "|".join(re.escape(d) for d in sorted(delimiters, key=len, reverse=True)) + r")\s*")
    cuts, pos = [], start
    for m in pattern.finditer(text, start, end):
        if len(cuts) >= max_steps - 1:
            break
        cuts.append((pos, m.start() + len(m.group().rstrip())))
        pos = m.end()
    cuts.append((pos, end))
    steps = []
    for a, b in cuts:
        piece = text[a:b]
        a, b = a + len(piece) - len(piece.lstrip()), b - (len(piece) - len(piece.rstrip()))
        if b > a:
            steps.append((a, b))
    return steps


def completion_steps(
    completion: str, delimiters: Sequence[str] = DEFAULT_DELIMITERS, max_steps: int = DEFAULT_MAX_STEPS
) -> list[tuple[int, int]]:
    """Steps of the think block (of the whole completion without one), offsets into `completion`."""
    span = think_span(completion)
    a, b = span if span else (0, len(completion))
    return split_steps(completion, delimiters, a, b, max_steps)


# Sum claims are matched on the reversed text, where a claim starts with its result: `51=8+7` for `7+8=15`. Matching
# may start only at the first digit of a digit run (lookbehind), every quantifier is bounded or possessive, and the
# whole pattern sits in a lookahead so that claims sharing a number (`2+3=5+1=6`) are all found: linear time, one C pass.
_CLAIM_REVERSED = re.compile(
    rf"(?<![0-9])(?=([0-9]{{1,{_MAX_DIGITS}}}) *(=) *([0-9]{{1,{_MAX_DIGITS}}}(?: *\+ *[0-9]{{1,{_MAX_DIGITS}}})++)(?![0-9]))"
)


def arithmetic_claims_at(text: str) -> list[tuple[int, list[int], int]]:
    """(offset of '=', terms, stated sum) for every `a+b(+c...)=s` in `text`, in text order."""
    if "=" not in text or "+" not in text:
        return []
    rev, n = text[::-1], len(text)
    claims = [
        (n - 1 - m.start(2), [int(t) for t in m.group(3)[::-1].split("+")], int(m.group(1)[::-1]))
        for m in _CLAIM_REVERSED.finditer(rev)
    ]
    return claims[::-1]


def _claim_checks(text: str) -> tuple[list[int], list[bool]]:
    """Offsets of the '=' of every sum claim (ascending) and whether each claim is true; the hot path of the rule."""
    if "=" not in text or "+" not in text:
        return [], []
    n, pos, ok = len(text), [], []
    for m in _CLAIM_REVERSED.finditer(text[::-1]):
        pos.append(n - 1 - m.start(2))
        ok.append(sum(map(int, m.group(3)[::-1].split("+"))) == int(m.group(1)[::-1]))
    return pos[::-1], ok[::-1]


def arithmetic_claims(text: str) -> list[tuple[list[int], int]]:
    """Every `a+b(+c...)=s` in `text`, as (terms, stated sum)."""
    return [(terms, s) for _, terms, s in arithmetic_claims_at(text)]


def arithmetic_step_reward(step: str, neutral: float = 0.5) -> float:
    """1.0 if every sum claimed in the step is right, 0.0 if any is wrong, `neutral` if it claims none."""
    claims = arithmetic_claims(step)
    if not claims:
        return neutral
    return 1.0 if all(sum(terms) == s for terms, s in claims) else 0.0


def score_steps(
    completions: list[str],
    step_reward: Callable[[list[tuple[str, str, int, int]]], list[float]],
    prompts: list[str],
    answer: list[str] | None = None,
    delimiters: Sequence[str] = DEFAULT_DELIMITERS,
    neutral: float = 0.5,
    max_steps: int = DEFAULT_MAX_STEPS,
    **columns,
) -> list[list[tuple[int, float]]]:
    """Split every completion into steps, score all steps in one call of
    `step_reward([(prompt, completion, step_start, step_end), ...])`, and add the final answer step (module docstring).
    """
    if not delimiters or any(not isinstance(d, str) or not d for d in delimiters):
        raise ValueError(f"delimiters must be non-empty strings (got {delimiters!r})")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (got {max_steps})")
    steps = [completion_steps(c, delimiters, max_steps) for c in completions]
    flat = [(prompts[i], completions[i], a, e) for i, st in enumerate(steps) for a, e in st]
    flat_rewards = iter(step_reward(flat)) if flat else iter(())
    final = is_correct(completions, answer, **columns) if answer is not None else None
    out = []
    for i, (c, st) in enumerate(zip(completions, steps)):
        pairs = [(e, float(next(flat_rewards))) for _, e in st]
        if not pairs or pairs[-1][0] < len(c.rstrip()):
            pairs.append((len(c), neutral if final is None else float(final[i])))
        out.append(pairs)
    return out


def process_arithmetic_reward(
    prompts: list[str],
    completions: list[str],
    answer: list[str] | None = None,
    delimiters: Sequence[str] = DEFAULT_DELIMITERS,
    neutral: float = 0.5,
    max_steps: int = DEFAULT_MAX_STEPS,
    **columns,
) -> list[list[tuple[int, float]]]:
    """Per completion, (step end offset, reward) per step: each step's sum claims checked (`arithmetic_step_reward`)."""

    def rule(items: list[tuple[str, str, int, int]]) -> list[float]:
        # claims found once per completion, then given to the step holding their '=' (the same as checking step by
        # step, since a claim never spans a step boundary: delimiters hold no digit, '+', '=' or inner space)
        out, cache = [], {}
        for _, c, a, e in items:
            if id(c) not in cache:
                cache[id(c)] = _claim_checks(c)
            pos, ok = cache[id(c)]
            lo, hi = bisect.bisect_left(pos, a), bisect.bisect_left(pos, e)
            out.append(neutral if lo == hi else float(all(ok[lo:hi])))
        return out

    return score_steps(completions, rule, prompts, answer, delimiters, neutral, max_steps, **columns)


def process_reward_model(
    scorer, delimiters: Sequence[str] = DEFAULT_DELIMITERS, neutral: float = 0.5, max_steps: int = DEFAULT_MAX_STEPS
):
    """A process reward function scoring each step with a reward model: the score of prompt + completion up to the end
    of that step (PRM style). `scorer` has `.score(texts) -> list[float]` (a `RewardModelScorer`)."""

    def step_scores(items):
        return scorer.score([p + c[:e] for p, c, _, e in items])

    def reward(prompts, completions, answer=None, **columns):
        return score_steps(completions, step_scores, prompts, answer, delimiters, neutral, max_steps, **columns)

    reward.process = True
    return reward


process_arithmetic_reward.process = True
