"""Cron expressions checked without importing Prefect (`r1 validate` must start fast; croniter is not installed).

Accepts the five-field subset Prefect's scheduler (its vendored croniter) takes: per field `*`, `?` (day, weekday),
numbers and names (jan-dec, sun-sat), ranges `a-b`, steps `/n`, lists `a,b`; `L` for the last day of the month; `L<d>`
(last weekday d of the month) and `<d>#<k>` (k-th weekday d, k 1-5). Prefect refuses random/hashed (`R`, `H`)
expressions, and so does this. `tests/test_cron.py` checks that it agrees with Prefect's own validator.
"""

from __future__ import annotations

import re

MONTHS = {m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}
WEEKDAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
# (name, lowest, highest, names)
FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day", 1, 31, {}), ("month", 1, 12, MONTHS),
          ("weekday", 0, 7, WEEKDAYS))
_NUMBER = re.compile(r"\d+|[a-z]{3}")


def _value(text: str, low: int, high: int, names: dict[str, int]) -> bool:
    if not _NUMBER.fullmatch(text):
        return False
    value = names.get(text) if text.isalpha() else int(text)
    return value is not None and low <= value <= high


def _term(term: str, field: str, low: int, high: int, names: dict[str, int]) -> bool:
    base, slash, step = term.partition("/")
    if slash and not (step.isdigit() and int(step) >= 1):
        return False
    if base == "*" or (base == "?" and field in ("day", "weekday")):
        return True
    if field == "day" and base == "l" and not slash:
        return True
    if field == "weekday" and not slash:
        if base.startswith("l") and _value(base[1:], low, high, names):
            return True
        if "#" in base:
            day, _, nth = base.partition("#")
            return _value(day, low, high, names) and nth in ("1", "2", "3", "4", "5")
    first, dash, last = base.partition("-")
    return _value(first, low, high, names) and (not dash or _value(last, low, high, names))


def is_valid_cron(cron: str) -> bool:
    """True when `cron` is a five-field cron expression Prefect would schedule."""
    parts = cron.lower().split()
    if len(parts) != len(FIELDS):
        return False
    return all(term and _term(term, name, low, high, names)
               for part, (name, low, high, names) in zip(parts, FIELDS, strict=True) for term in part.split(","))
