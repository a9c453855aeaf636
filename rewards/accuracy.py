"""Is the final answer right? 1.0 or 0.0 per completion.

Order of checks for one row (the first that applies decides):
1. no extractable answer (see `rewards.parsing`) -> 0.0;
2. `task` "rg:<family>" -> reasoning-gym's own scorer for that family, given the row's answer and metadata (its partial
   credit counts as correct only at >= 1.0, so the reward stays binary);
3. both answers plain numbers (after light normalisation: `$..$`, `\\boxed{}`, thousands commas, a trailing period) ->
   exact numeric comparison, no math-verify (the fast path that keeps a 1,024-completion batch cheap);
4. normalised strings equal -> 1.0;
5. otherwise math-verify (LaTeX, fractions, expressions), in worker processes with a deadline: a hang scores 0 and logs
   a warning instead of stalling the trainer. Answers over MAX_MATH_CHARS characters score 0 without it.
"""

from __future__ import annotations

import json
import logging
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from rewards.math_verifier import shared_verifier
from rewards.parsing import AnswerMode, extract_answer, extract_boxed, shorten

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MAX_NUMBER_CHARS = 400  # longer digit strings are not "plain numbers" (int() refuses > 4300 digits anyway)
MAX_MATH_CHARS = 2000  # an "answer" longer than this is not sent to math-verify: it scores 0 at once


def normalize_answer(s: str) -> str:
    """Light, safe normalisation: outer whitespace, `$...$`, one `\\boxed{}`, `\\text{}`, a trailing period, case."""
    s = s.strip()
    for _ in range(3):
        before = s
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        if s.startswith(("\\boxed", "\\fbox")):
            inner = extract_boxed(s)
            if inner is not None:
                s = inner
        if s.startswith("\\text{") and s.endswith("}"):
            s = s[6:-1].strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    return " ".join(s.split()).lower()


def as_number(s: str) -> Decimal | None:
    """A plain integer or decimal (optionally with thousands commas) as an exact Decimal, else None."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


@lru_cache(maxsize=256)
def _rg_scorer(family: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(family)  # raises ValueError naming an unknown family


def _metadata(m: Any) -> dict:
    if m is None or m == "":
        return {}
    if isinstance(m, dict):
        return m
    return json.loads(m)


def score_reasoning_gym(family: str, prediction: str, gold: str, metadata: Any, question: str = "") -> float:
    """reasoning-gym's score (0..1) for `prediction`; its scorer reads the entry's `answer` and `metadata`."""
    scorer = _rg_scorer(family)  # an unknown family is a configuration error: it raises
    entry = {"question": question, "answer": gold, "metadata": _metadata(metadata)}
    try:
        return float(scorer(prediction, entry))
    except Exception as e:  # noqa: BLE001 - a scorer choking on a model's garbage is a wrong answer, not a crash of the trainer
        log.warning("reasoning-gym scorer %s failed on %r: %s", family, shorten(prediction, 120), e)
        return 0.0


def accuracy_reward(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    task: list[str] | None = None,
    metadata: list[Any] | None = None,
    *,
    answer_mode: AnswerMode = "auto",
    math_verify: bool = True,
    math_verify_timeout: float = 5.0,
    math_verify_workers: int = 1,
    **kwargs,
) -> list[float]:
    """1.0 where the completion's final answer matches the row's `answer`, else 0.0 (checks: module docstring)."""
    if math_verify_timeout <= 0 or math_verify_workers < 1:
        raise ValueError(
            f"need math_verify_timeout > 0 and math_verify_workers >= 1 "
            f"(got {math_verify_timeout}, {math_verify_workers})"
        )
    n = len(completions)
    task = task if task is not None else [None] * n
    metadata = metadata if metadata is not None else [None] * n
    question = kwargs.get("question") or [""] * n  # the dataset row's question, handed to reasoning-gym's entry
    out = [0.0] * n
    to_verify: dict[int, tuple[str, str]] = {}
    for i, (completion, gold) in enumerate(zip(completions, answer)):
        pred = extract_answer(completion, answer_mode)
        if pred is None or gold is None:
            continue
        gold = str(gold)
        t = task[i] or ""
        if t.startswith("rg:"):
            out[i] = float(score_reasoning_gym(t[3:], pred, gold, metadata[i], question[i]) >= 1.0)
            continue
        p, g = normalize_answer(pred), normalize_answer(gold)
        pn, gn = as_number(p), as_number(g)
        if pn is not None and gn is not None:
            out[i] = float(pn == gn)
        elif p == g:
            out[i] = 1.0
        elif math_verify and p and len(pred) <= MAX_MATH_CHARS:
            to_verify[i] = (pred, gold)
    if to_verify:
        verifier = shared_verifier(math_verify_workers, math_verify_timeout)
        for i, ok in zip(to_verify, verifier.verify_many(list(to_verify.values()))):
            out[i] = float(ok)
    return out


def is_correct(completions: list[str], answer: list[str], **columns) -> list[bool]:
    """Per completion: is the answer right (the same rules as `accuracy_reward`)."""
    return [r >= 1.0 for r in accuracy_reward([""] * len(completions), completions, answer, **columns)]
