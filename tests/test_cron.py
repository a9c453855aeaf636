"""Schedules are checked without importing Prefect, and the check agrees with Prefect's own validator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.cron import is_valid_cron

ROOT = Path(__file__).resolve().parents[1]

CASES = ["0 2 * * *", "*/5 * * * *", "0 0 L * *", "0 0 * * 5#2", "0 0 * * L5", "0 0 * * 7", "0 0 * * sun-sat",
         "0 0 1 jan,feb *", "0 0 ? * *", "0 24 * * *", "60 * * * *", "0 0 0 * *", "0 0 32 * *", "0 0 * 13 *",
         "0 0 * * 8", "5-1 * * * *", "*/0 * * * *", "0 0 * * MON", "1,2,3 * * * *", "1-10/3 * * * *",
         "0 0 1-31/2 * *", "0 0 * jan-dec/2 *", "00 02 * * *", "1/5 * * * *", "-1 * * * *", "0 0 * * 6L",
         "0 0 LW * *", "0 0 15W * *", "0 0 * * 0#5", "0 0 * * 0#6", "*/60 * * * *", "* * * * 5#0", "H * * * *",
         "R 2 * * *", "0 2 * *", "0 2 * * * *", "0 2 * * mon,", "a b c d e", "0 2 ** * *", "0 2 * * 1-", "007 * * * *"]


def prefect_accepts(cron: str) -> bool:
    from prefect._internal.schemas.validators import validate_cron_string

    try:
        validate_cron_string(cron)
    except ValueError:
        return False
    return len(cron.split()) == 5  # recipes take five fields (Prefect's croniter also takes a seconds field)


@pytest.mark.parametrize("cron", CASES)
def test_cron_check_agrees_with_prefect(cron):
    assert is_valid_cron(cron) == prefect_accepts(cron), cron


TERM = st.one_of(st.sampled_from(["*", "?", "L", "l5", "5#2", "mon", "jan", "sun"]),
                 st.integers(0, 70).map(str),
                 st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda t: f"{t[0]}-{t[1]}"))
FIELD = st.tuples(st.lists(TERM, min_size=1, max_size=3).map(",".join),
                  st.sampled_from(["", "/2", "/0", "/15"])).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(FIELD, min_size=5, max_size=5).map(" ".join))
def test_what_the_recipe_accepts_prefect_schedules(cron):
    """Never accept a cron `r1 serve` would then fail on (the reverse is only a stricter refusal)."""
    if is_valid_cron(cron):
        assert prefect_accepts(cron), cron


def test_r1_validate_does_not_import_prefect(tmp_path):
    """`r1 validate` checks the preset's schedule without Prefect's import (seconds on a loaded machine)."""
    code = ("import json, sys; from typer.testing import CliRunner; from flows.cli import app; "
            "res = CliRunner().invoke(app, ['validate', 'tiny', '--set', 'schedules=[{flow: pipeline, cron: \"0 2 * * 1-5\"}]']); "
            "print(json.dumps([res.exit_code, res.output, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'torch', 'mlflow', 'transformers'))]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    exit_code, output, heavy = json.loads(out.splitlines()[-1])
    assert exit_code == 0 and "is valid" in output, output
    assert heavy == []


def test_a_bad_cron_is_still_refused_by_field():
    from stages.core.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"schedules\.0: cron '0 2 \* \* 8' is not a valid cron expression"):
        load_recipe("tiny", {"schedules": [{"flow": "pipeline", "cron": "0 2 * * 8"}]})
