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


WRONG = "def add(a, b):\n    return a - b\n"
GAMES = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "os.kill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\nimport sys\nsys.exit(0)",
    "close stdout": "import os, sys\nos.close(1)\nos.close(2)\nsys.exit(0)",
    "patch builtins": "import builtins\nbuiltins.AssertionError = type('Never', (Exception,), {})\n"
                      "__builtins__['AssertionError'] = builtins.AssertionError",
    "builtins in the tests": "import builtins\nbuiltins.add = lambda a, b: a + b\nadd = lambda a, b: a + b\n"
                             "del add",  # the tests see the builtins as they were before the solution
    "fake token": "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'0' * 32)\n    except OSError: pass\n"
                  "os._exit(0)",
    "read the token fd": "import os\nfor fd in range(3, 64):\n    try:\n        t = os.read(fd, 64)\n"
                         "        for w in range(3, 64):\n            try: os.write(w, t)\n            except OSError: pass\n"
                         "    except OSError: pass\nos._exit(0)",
    "audit event": "import sys, os\ntry: sys.audit('r1.passed')\nexcept Exception: pass\nos._exit(0)",
    "frames": "import sys, os\nf = sys._getframe(1)\nos.write(1, repr(f.f_locals).encode())\nos._exit(0)",
    "traceback frames": "import os\ntry: 1/0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame.f_back\n"
                        "    print(f.f_locals)\nos._exit(0)",
    "gc": "import gc, os\nfor o in gc.get_objects():\n    pass\nos._exit(0)",
    "memory": "import os\nos.open('/proc/self/mem', os.O_RDONLY)\nos._exit(0)",
    "signal handler": "import signal, os\nsignal.signal(signal.SIGALRM, lambda s, f: os._exit(0))\n"
                      "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)",
    "thread": "import threading, os, time\ndef go():\n    time.sleep(0.05)\n    os._exit(0)\n"
              "threading.Thread(target=go).start()\ntime.sleep(0.2)",
    "redefine the harness": "import __main__, os\ntry: __main__.harness()\nexcept BaseException: pass\nos._exit(0)",
    "exec the harness": "import os\nsrc = open('/proc/self/cmdline', 'rb').read()\nos._exit(0)",
    "trace": "import sys, os\nsys.settrace(lambda *a: None)\nos._exit(0)",
}


@pytest.mark.parametrize("name", list(GAMES))
def test_leaving_early_or_faking_success_scores_zero(name):
    passed, why = run_tests(WRONG + GAMES[name] + "\n", TESTS, **FAST)
    assert not passed, (name, why)


def test_a_correct_solution_using_the_stdlib_still_passes():
    code = ("import collections, enum, logging, typing, warnings\nP = collections.namedtuple('P', 'a b')\n"
            "class E(enum.Enum):\n    A = 1\nT = typing.TypeVar('T')\nlogging.getLogger('x').warning('hi')\n"
            "warnings.warn('careful')\ndef add(a, b):\n    return P(a, b).a + P(a, b).b\n")
    assert run_tests(code, TESTS, **FAST) == (True, "passed")
    assert run_tests(code + "import sys\nsys.exit(0)\n", TESTS, **FAST)[0] is False  # exit 0 before the tests


def test_patched_builtins_do_not_reach_the_tests():
    code = "import builtins\nbuiltins.len = lambda x: 3\ndef make():\n    return []\n"
    assert run_tests(code, "assert len(make()) == 3\n", **FAST)[0] is False
    assert run_tests(code.replace("[]", "[1, 2, 3]"), "assert len(make()) == 3\n", **FAST) == (True, "passed")
