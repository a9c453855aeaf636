"""code_tests: model-written Python runs against the row's tests in a locked-down subprocess. Correct code scores 1;
an infinite loop, a sleeper, a memory bomb, a socket, a subprocess, a fork and a big file write all score 0, quickly,
and leave this process as it was."""

from __future__ import annotations

import resource
import time

import pytest

from rewards import build_rewards, code_tests_reward, extract_code
from rewards.code import run_tests

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
GOOD = "<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"
FAST = {"timeout_seconds": 2.0, "cpu_seconds": 1, "memory_mb": 128}


def test_extracts_the_code_block_or_answer():
    assert extract_code(GOOD).strip() == "def add(a, b):\n    return a + b"
    assert extract_code("<answer>x = 1</answer>") == "x = 1"
    assert extract_code("```py\na\n```\n```python\nb\n```") == "b\n"
    assert extract_code("plain") == "plain"


def test_correct_code_passes_wrong_code_fails():
    comps = [GOOD, GOOD.replace("a + b", "a - b"), "def add(a, b): return a +", "no code at all"]
    assert code_tests_reward(["p"] * 4, comps, [TESTS] * 4, **FAST) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("name, code, why", [
    ("busy loop", "while True:\n    pass", r"SIGXCPU|SIGKILL|timed out"),
    ("sleeper", "import time\ntime.sleep(60)", r"timed out after 2 s"),
    ("memory bomb", "x = bytearray(2 * 1024**3)", r"MemoryError"),
    ("socket", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", r"blocked.*socket"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])", r"blocked.*subprocess"),
    ("os.system", "import os\nos.system('true')", r"blocked.*os\.system"),
    ("fork", "import os\nos.fork()", r"blocked.*os\.fork"),
    ("ctypes", "import ctypes\nctypes.CDLL(None)", r"blocked.*ctypes"),
    ("big file", "open('big', 'wb').write(b'0' * (8 * 1024**2))", r"SIGXFSZ|File too large"),
])
def test_hostile_code_scores_zero_and_the_parent_is_untouched(name, code, why):
    before = resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU)
    t0 = time.monotonic()
    ok, reason = run_tests(code + "\ndef add(a, b):\n    return a + b\n", TESTS, **FAST)
    assert not ok and __import__("re").search(why, reason), (name, reason)
    assert time.monotonic() - t0 < 10
    assert (resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU)) == before


def test_network_namespace_where_the_kernel_allows_it():
    """Where unprivileged user namespaces exist (here: yes), each run also gets its own empty network namespace."""
    ok, why = run_tests("pass", "", require_netns=True, **FAST)
    if not ok and "no network namespace" in why:
        pytest.skip("this kernel allows no unprivileged network namespace: the audit hook alone guards the network")
    assert ok, why


def test_a_batch_runs_in_parallel_and_one_bad_sample_costs_only_its_timeout():
    comps = [GOOD] * 3 + ["import time\ntime.sleep(60)"]
    t0 = time.monotonic()
    assert code_tests_reward(["p"] * 4, comps, [TESTS] * 4, workers=4, **FAST) == [1.0, 1.0, 1.0, 0.0]
    assert time.monotonic() - t0 < 8


def test_registered_by_name_with_checked_params():
    [(name, fn, _weight)] = build_rewards([{"name": "code_tests", "params": {"timeout_seconds": 2}}])
    assert name == "code_tests" and fn(["p"], [GOOD], answer=[TESTS]) == [1.0]
    with pytest.raises(ValueError, match="reward 'code_tests'.*memory_mb >= 32"):
        build_rewards([{"name": "code_tests", "params": {"memory_mb": 1}}])
    with pytest.raises(ValueError, match="unknown param 'network'"):
        build_rewards([{"name": "code_tests", "params": {"network": True}}])
