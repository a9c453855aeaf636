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
import functools
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from rewards.accuracy import is_correct
from rewards.parsing import think_span

DEFAULT_DELIMITERS = (". ", "\n")
DEFAULT_MAX_STEPS = 512
_MAX_DIGITS = 100  # longer numbers are not judged (and int() of huge digit strings is slow or refused)


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


# An arithmetic claim is `expression = value`: the whole expression before the '=' (+ - * / ^ and parentheses, with
# precedence) against the whole expression after it. A chain `2+3=5+1=6` is two claims, `2+3=5` and `5+1=6`: the right
# side may go on computing from its leading number. A claim is judged only on whole numbers: one cut by the window, or
# touching a ',' or '.' that continues it (`1,234`, `1.2.3`), is not judged (neutral); so is anything the evaluator
# refuses (a huge power, a division by zero, a malformed expression).
_CHAIN = re.compile(r"[0-9.+\-*/^×÷() =]+")
_TOKEN = re.compile(r"(\d+(?:\.\d+)?)|(\*\*|[-+*/^×÷()])|(\.)|(\s+)")
_WINDOW = 80  # characters of expression read on each side of an '=': longer expressions are not judged
_MAX_BITS = 512  # of a power's result: 9^9^9 is refused, not computed


class _Unjudged(Exception):
    pass


def _pieces(text: str, cut_start: bool, cut_end: bool) -> list[list[str]]:
    """The expressions in `text`, as token lists: split where a stray '.' or two adjacent operands separate them.
    A piece whose number may continue past `text` (cut at the start or end) is dropped."""
    pieces, cur, pos, last_kind = [], [], 0, None
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Unjudged
        num, op, dot, _ = m.groups()
        if num is not None:
            if len(num) > _MAX_DIGITS or text.startswith(".", m.end()) and text[m.end() + 1 : m.end() + 2].isdigit():
                raise _Unjudged  # `1.2.3`: not one number
            if pos > 0 and text[pos - 1] == ".":
                raise _Unjudged
            if last_kind in ("num", ")"):
                pieces.append(cur)
                cur = []
            cur.append(num)
            last_kind = "num"
        elif op is not None:
            if op == "(" and last_kind in ("num", ")"):
                pieces.append(cur)
                cur = []
            cur.append(op)
            last_kind = ")" if op == ")" else "op"
        elif dot is not None:
            pieces.append(cur)
            cur, last_kind = [], None
        pos = m.end()
    pieces.append(cur)
    if cut_start:
        pieces[0] = []
    if cut_end:
        pieces[-1] = []
    return [p for p in pieces if p]


def _evaluate(tokens: list[str]) -> Fraction:
    """The value of an arithmetic expression: + - * / (also × ÷), ^ or ** (right-associative, above unary minus),
    parentheses; exact (fractions). Raises _Unjudged on anything else."""
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term():
        value = unary()
        while peek() in ("*", "/", "×", "÷"):
            op, rhs = take(), unary()
            if op in ("/", "÷"):
                if rhs == 0:
                    raise _Unjudged
                value /= rhs
            else:
                value *= rhs
        return value

    def unary():
        if peek() in ("+", "-"):
            return unary() if take() == "+" else -unary()
        return power()

    def power():
        base = atom()
        if peek() in ("^", "**"):
            take()
            exp = unary()
            if exp.denominator != 1 or abs(exp) * max(abs(base.numerator), abs(base.denominator)).bit_length() > _MAX_BITS:
                raise _Unjudged
            if base == 0 and exp < 0:
                raise _Unjudged
            return base**int(exp)
        return base

    def atom():
        tok = take() if peek() is not None else None
        if tok == "(":
            value = expr()
            if peek() != ")":
                raise _Unjudged
            take()
            return value
        if tok is None or not tok[0].isdigit():
            raise _Unjudged
        return Fraction(tok)

    value = expr()
    if pos != len(tokens):
        raise _Unjudged
    return value


def _agrees(value: Fraction, stated: str) -> bool:
    """`value` written as the number `stated`: exactly, or rounded to the decimals it shows (1/3 = 0.333)."""
    decimals = len(stated.partition(".")[2])
    return abs(value - Fraction(stated)) <= (Fraction(1, 2 * 10**decimals) if decimals else 0)


@functools.lru_cache(maxsize=65536)
def judge_claim(left: str, right: str, cut_left: bool = False, cut_right: bool = False) -> bool | None:
    """Is `left = right` right? `left` is the text before the '=' (its last expression is the claim's left side),
    `right` the text after it (its first expression); None when there is no claim to judge."""
    try:
        lhs, rhs = _pieces(left, cut_left, False), _pieces(right, False, cut_right)
        if not lhs or not rhs:
            return None
        lhs, rhs = lhs[-1], rhs[0]
        if not any(t in ("+", "-", "*", "/", "×", "÷", "^", "**") for t in lhs[1:]):
            return None  # `x = 5`, `8 = 8`, `-3 = ...`: no computation claimed
        value = _evaluate(lhs)
        if len(rhs) == 1 or (len(rhs) == 2 and rhs[0] == "-"):
            return _agrees(value if len(rhs) == 1 else -value, rhs[-1])
        if _evaluate(rhs) == value:
            return True
        lead = 1 if rhs[0] == "-" else 0  # `2+3=5+1=6`: the right side computes on from its leading number
        return rhs[lead][0].isdigit() and _agrees(-value if lead else value, rhs[lead])
    except (_Unjudged, ZeroDivisionError, OverflowError, ValueError):
        return None


def _claim_checks(text: str) -> tuple[list[int], list[bool]]:
    """Offsets of the '=' of every judged claim (ascending) and whether each is right; the hot path of the rule."""
    pos, ok = [], []
    if "=" not in text:
        return pos, ok
    for m in _CHAIN.finditer(text):
        run = m.group()
        if "=" not in run:
            continue
        # a number continuing past the run (`1,234`) is cut: the claim touching it is not judged
        cut_start = m.start() > 0 and text[m.start() - 1] == "," and m.start() > 1 and text[m.start() - 2].isdigit()
        cut_end = text[m.end() : m.end() + 1] == "," and text[m.end() + 1 : m.end() + 2].isdigit()
        segs, at = run.split("="), m.start()
        for i in range(len(segs) - 1):
            at += len(segs[i])
            left, right = segs[i], segs[i + 1]
            verdict = judge_claim(
                left[-_WINDOW:],
                right[:_WINDOW],
                len(left) > _WINDOW or (i == 0 and cut_start),
                len(right) > _WINDOW or (i + 1 == len(segs) - 1 and cut_end),
            )
            if verdict is not None:
                pos.append(at)
                ok.append(verdict)
            at += 1
    return pos, ok


def arithmetic_claims(text: str) -> list[tuple[int, bool]]:
    """(offset of '=', right?) for every arithmetic claim judged in `text`, in text order."""
    return list(zip(*_claim_checks(text)))


def arithmetic_step_reward(step: str, neutral: float = 0.5) -> float:
    """1.0 if every claim judged in the step is right, 0.0 if any is wrong, `neutral` if it makes none."""
    _, ok = _claim_checks(step)
    return neutral if not ok else float(all(ok))


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
