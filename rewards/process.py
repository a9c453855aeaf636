"""Process rewards: one reward per reasoning step, as (step end offset, reward) pairs per completion.

The offset is the exclusive end, in characters, of the step inside the completion string (`completion[:end]` ends with
the step); the GRPO engine maps characters to tokens. Steps are the think block split after each delimiter (default: a
sentence end ". " or a newline; the step keeps its period, the whitespace after it goes to the next step). Without a
think block the whole completion is split. What follows the last step (the answer block) forms a final step ending at
`len(completion)`, rewarded 1/0 for the final answer when the row has an `answer`, else with the neutral value, so
that every token is covered by some step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rewards.accuracy import is_correct
from rewards.parsing import think_span

DEFAULT_DELIMITERS = (". ", "\n")
_MAX_DIGITS = 100  # longer numbers are not arithmetic claims (and int() of huge digit strings is slow or refused)


def split_steps(
    text: str, delimiters: Sequence[str] = DEFAULT_DELIMITERS, start: int = 0, end: int | None = None
) -> list[tuple[int, int]]:
    """(start, end) of each non-blank step of text[start:end], split after each delimiter; outer whitespace trimmed."""
    if not delimiters or any(not d for d in delimiters):
        raise ValueError(f"delimiters must be non-empty strings (got {delimiters!r})")
    end = len(text) if end is None else end
    pattern = re.compile("|".join(re.escape(d) for d in sorted(delimiters, key=len, reverse=True)))
    cuts, pos = [], start
    for m in pattern.finditer(text, start, end):
        cuts.append((pos, m.start() + len(m.group().rstrip())))
        pos = m.end()
    cuts.append((pos, end))
    steps = []
    for a, b in cuts:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            steps.append((a, b))
    return steps


def completion_steps(completion: str, delimiters: Sequence[str] = DEFAULT_DELIMITERS) -> list[tuple[int, int]]:
    """Steps of the think block (of the whole completion without one), offsets into `completion`."""
    span = think_span(completion)
    a, b = span if span else (0, len(completion))
    return split_steps(completion, delimiters, a, b)


def arithmetic_claims(text: str) -> list[tuple[list[int], int]]:
    """Every `a+b(+c...)=s` in `text`, as (terms, stated sum). A linear scan outward from each '=' (no regex
    backtracking, so a hostile 1 MB string of '1+1+1...' costs linear time)."""
    claims = []
    n = len(text)
    for eq in (m.start() for m in re.finditer("=", text)):
        j = eq - 1  # left: digits, '+' and spaces
        while j >= 0 and (text[j].isdigit() or text[j] in "+ "):
            j -= 1
        lhs = text[j + 1 : eq]
        k = eq + 1  # right: optional spaces then digits
        while k < n and text[k] == " ":
            k += 1
        r0 = k
        while k < n and text[k].isdigit() and k - r0 <= _MAX_DIGITS:
            k += 1
        rhs = text[r0:k]
        terms = [t.strip() for t in lhs.split("+")]
        head = terms[0].split()  # "write 5 carry 1 3+4=7": the first term is the last number before the '+'
        terms[0] = head[-1] if head else ""
        if not rhs or len(terms) < 2 or not all(t.isascii() and t.isdigit() for t in terms) or not rhs.isascii():
            continue
        if len(rhs) > _MAX_DIGITS or any(len(t) > _MAX_DIGITS for t in terms):
            continue
        claims.append(([int(t) for t in terms], int(rhs)))
    return claims


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
    **columns,
) -> list[list[tuple[int, float]]]:
    """Split every completion into steps, score all steps in one call of
    `step_reward([(prompt, completion, step_start, step_end), ...])`, and add the final answer step (module docstring).
    """
    steps = [completion_steps(c, delimiters) for c in completions]
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
    **columns,
) -> list[list[tuple[int, float]]]:
    """Per completion, (step end offset, reward) per step: each step's sum claims checked (`arithmetic_step_reward`)."""

    def rule(items: list[tuple[str, str, int, int]]) -> list[float]:
        return [arithmetic_step_reward(c[a:e], neutral) for _, c, a, e in items]

    return score_steps(completions, rule, prompts, answer, delimiters, neutral, **columns)


def process_reward_model(scorer, delimiters: Sequence[str] = DEFAULT_DELIMITERS, neutral: float = 0.5):
    """A process reward function scoring each step with a reward model: the score of prompt + completion up to the end
    of that step (PRM style). `scorer` has `.score(texts) -> list[float]` (a `RewardModelScorer`)."""

    def reward(prompts, completions, answer=None, **columns):
        return score_steps(
            completions, lambda items: scorer.score([p + c[:e] for p, c, _, e in items]), prompts, answer, delimiters, neutral,
            **columns,
        )

    reward.process = True
    return reward


process_arithmetic_reward.process = True
