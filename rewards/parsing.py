"""Pulling the think block and the answer out of a completion, and checking the R1 template.

Everything here scans with `str.find` or regexes that cannot backtrack, so a hostile 1 MB completion costs linear time.

Rules (shared by every reward, so that they agree with each other):
- think block: the text between the first `<think>` and the first `</think>` after it. An unclosed `<think>` runs to the
  first `<answer>` (or the end). No `<think>` at all: no think block (None).
- answer, `mode="tag"`: the content of the one `<answer>...</answer>` block after the think block. Two or more answer
  blocks, an unclosed one, or a template tag inside it give None: a model must not win by hedging or by nesting.
- answer, `mode="boxed"`: the content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched.
- answer, `mode="auto"`: "tag" when the completion has an `<answer>` tag, otherwise "boxed".
"""

from __future__ import annotations

import re
from typing import Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

AnswerMode = Literal["auto", "tag", "boxed"]
ANSWER_MODES = ("auto", "tag", "boxed")


def _has_tag(text: str) -> bool:
    return any(t in text for t in TAGS)


def think_span(text: str) -> tuple[int, int] | None:
    """(start, end) character offsets of the think block's content in `text`, or None without a `<think>`."""
    i = text.find(THINK_OPEN)
    if i < 0:
        return None
    start = i + len(THINK_OPEN)
    end = text.find(THINK_CLOSE, start)
    if end < 0:  # unclosed: stop at the answer if there is one
        end = text.find(ANSWER_OPEN, start)
        if end < 0:
            end = len(text)
    return start, end


def extract_think(text: str) -> str | None:
    """The reasoning inside `<think>...</think>`; None when there is no think block."""
    span = think_span(text)
    return None if span is None else text[span[0] : span[1]]


def after_think(text: str) -> str:
    """Everything after the think block (the final response a reader sees); the whole text without a closed one."""
    i = text.find(THINK_CLOSE)
    return text if i < 0 else text[i + len(THINK_CLOSE) :]


def extract_tag_answer(text: str) -> str | None:
    """Content of the single `<answer>` block after the think block (see the module rules), stripped."""
    rest = after_think(text)
    i = rest.find(ANSWER_OPEN)
    if i < 0:
        return None
    start = i + len(ANSWER_OPEN)
    end = rest.find(ANSWER_CLOSE, start)
    if end < 0:
        return None
    content = rest[start:end]
    if _has_tag(content) or ANSWER_OPEN in rest[end:]:
        return None
    return content.strip()


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with matched braces; None if there is none or it never closes."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for j in range(start, len(text)):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:j].strip()
        return None  # the last box is the final answer; unclosed means it was cut off
    return None


def extract_answer(text: str, mode: AnswerMode = "auto") -> str | None:
    """The final answer of a completion, or None. `mode`: "tag" (R1 `<answer>`), "boxed" (last `\\boxed{}`) or "auto"."""
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {mode!r}; known: {ANSWER_MODES}")
    if mode == "tag" or (mode == "auto" and ANSWER_OPEN in text):
        return extract_tag_answer(text)
    return extract_boxed(text)


def is_r1_format(text: str) -> bool:
    """Exactly `<think>...</think><answer>...</answer>`, with only whitespace around and between the blocks.

    Contents may be empty (as in R1's own `^<think>.*?</think>\\s*<answer>.*?</answer>$`) but may not hold any tag.
    """
    s = text.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    close = s.find(THINK_CLOSE)
    if close < 0 or _has_tag(s[len(THINK_OPEN) : close]):
        return False
    rest = s[close + len(THINK_CLOSE) :].lstrip()
    if not rest.startswith(ANSWER_OPEN) or len(rest) < len(ANSWER_OPEN) + len(ANSWER_CLOSE):
        return False
    return not _has_tag(rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)])


def ordered_tag_count(text: str) -> int:
    """How many of the four template tags appear in template order (the longest in-order subsequence, 0..4)."""
    # best[k] = smallest end position after choosing k tags in order; -1 = impossible
    best = [0] + [-1] * len(TAGS)
    for tag in TAGS:
        for k in range(len(TAGS) - 1, -1, -1):
            if best[k] < 0:
                continue
            j = text.find(tag, best[k])
            if j >= 0 and (best[k + 1] < 0 or j + len(tag) < best[k + 1]):
                best[k + 1] = j + len(tag)
    return max(k for k in range(len(best)) if best[k] >= 0)


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut in the middle to about `limit` characters, for error messages and logs."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ...[{len(text) - 2 * half} chars]... {text[-half:]}"
