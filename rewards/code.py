"""code_tests: run the Python a completion wrote against the row's tests, in a locked-down subprocess; 1.0 if every
test passes, else 0.0.

The code is the completion's ```python block (the last one), else its <answer>…</answer>, else the whole completion; the
tests are the row's `answer` column (Python statements, typically asserts), run after the code in the same namespace.

What is enforced on each run (a fresh `python -I -S` process per completion, its own session, started by this module):
- time: RLIMIT_CPU (`cpu_seconds`) and a wall-clock timeout (`timeout_seconds`) after which the whole process group is
  SIGKILLed (a sleeping or blocked program burns no CPU);
- memory: RLIMIT_AS (`memory_mb` of address space), so a memory bomb fails with MemoryError; RLIMIT_FSIZE caps any file
  it writes (1 MB), RLIMIT_NOFILE open files (64), RLIMIT_CORE 0;
- network: a new network namespace (unshare(CLONE_NEWUSER|CLONE_NEWNET): no interface but a down loopback) where the
  kernel allows unprivileged user namespaces, and in every case an audit hook, installed before the code runs, that
  refuses socket creation and connection, subprocesses, fork/exec/spawn, os.system and ctypes/dlopen;
- isolation: `-I -S` (no user site, no site-packages, no PYTHON* variables), an empty environment but PATH, a fresh
  temporary working directory removed afterwards, stdin closed, output discarded (the last 2 kB of stderr are kept for
  debugging).

Not enforced: a filesystem sandbox (the code can read files its user can read, and write small files), and the audit
hook is a CPython-level guard that native code could bypass (the namespace, where available, and the rlimits are
kernel-level). For untrusted models at scale, run rewards in a container or VM on top of this.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The child's first code: limits, namespace, audit hook; then the solution and the tests, in one namespace.
_BOOT = r'''
import ctypes, json, resource, sys
cfg = json.loads(sys.argv[1])
mb = 1 << 20
for lim, value in ((resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                   (resource.RLIMIT_FSIZE, mb), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (value, value))
try:
    isolated = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0  # CLONE_NEWUSER | CLONE_NEWNET
except Exception:
    isolated = False
if cfg["require_netns"] and not isolated:
    sys.exit(3)
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "pty.", "ctypes.", "_ctypes")
def guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"blocked in the code_tests sandbox: {event}")
sys.addaudithook(guard)
del ctypes, json, resource
code = open("solution.py").read() + "\n\n" + open("tests.py").read()
namespace = {"__name__": "__main__"}
exec(compile(code, "solution.py", "exec"), namespace)
'''


def extract_code(completion: str) -> str:
    """The last ```python block, else the <answer> content, else the completion itself."""
    blocks = _BLOCK.findall(completion)
    if blocks:
        return blocks[-1]
    answer = _ANSWER.findall(completion)
    return answer[-1] if answer else completion


def run_tests(code: str, tests: str, timeout_seconds: float = 5.0, cpu_seconds: int = 5, memory_mb: int = 256,
              require_netns: bool = False) -> tuple[bool, str]:
    """(passed, why) for one solution: exit status 0 within the limits is a pass."""
    import json

    work = Path(tempfile.mkdtemp(prefix="r1-code-"))
    try:
        (work / "solution.py").write_text(code)
        (work / "tests.py").write_text(tests)
        cfg = json.dumps({"memory_mb": memory_mb, "cpu_seconds": cpu_seconds, "require_netns": require_netns})
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT, cfg], cwd=work, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": os.defpath},
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return False, f"timed out after {timeout_seconds:g} s"
        tail = err[-2000:].decode(errors="replace").strip()
        if proc.returncode == 0:
            return True, "passed"
        if proc.returncode == 3 and require_netns:
            return False, "no network namespace available (require_netns)"
        if proc.returncode < 0:
            return False, f"killed by {signal.Signals(-proc.returncode).name}"
        return False, tail.splitlines()[-1] if tail else f"exit {proc.returncode}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def code_tests_reward(prompts: list[str], completions: list[str], answer: list[str], timeout_seconds: float = 5.0,
                      cpu_seconds: int = 5, memory_mb: int = 256, workers: int = 4,
                      require_netns: bool = False, **kwargs) -> list[float]:
    """1.0 per completion whose code passes its row's tests (`answer`), else 0.0; `workers` sandboxes at a time.

    require_netns: score 0 rather than run where no network namespace can be made (the audit hook alone then guards
    the network)."""
    if timeout_seconds <= 0 or cpu_seconds < 1 or memory_mb < 32 or workers < 1:
        raise ValueError("timeout_seconds must be > 0, cpu_seconds >= 1, memory_mb >= 32 and workers >= 1")

    def one(i: int) -> float:
        ok, _ = run_tests(extract_code(completions[i]), answer[i], timeout_seconds, cpu_seconds, memory_mb,
                          require_netns)
        return 1.0 if ok else 0.0

    if not completions:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(completions))) as pool:
        return list(pool.map(one, range(len(completions))))
