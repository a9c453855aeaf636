"""code_tests: run the Python a completion wrote against the row's tests, in a locked-down subprocess; 1.0 if every
test passes, else 0.0.

The code is the completion's ```python block (the last one), else its <answer>…</answer>, else the whole completion; the
tests are the row's `answer` column (Python statements, typically asserts), run after the code with its names and the
builtins as they were before it ran. A pass is the run's random token, written by the harness after the last test (an
exit status 0 proves nothing: the code can exit before the tests run).

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

Not enforced: tests comparing with objects the solution made (an `__eq__` that always says True) or using modules it
patched; a filesystem sandbox (the code can read files its user can read, and write small files); and the audit hook
is a CPython-level guard that native code or an interpreter bug could bypass (the namespace, where available, and the
rlimits are kernel-level). For untrusted models at scale, run rewards in a container or VM on top of this.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The child's first code: limits, namespace, audit hook; then the solution, then the tests in a namespace of their own
# with the builtins as they were before the solution ran. A pass is not an exit status (the solution can exit 0 before
# the tests run): it is the run's random token, which the parent writes into a pipe the child reads before the solution
# runs, and which the harness writes to the result pipe only from its own frame after the last test. The token then
# lives only in the audit hook's closure, out of reach: the hook refuses what reaches another frame's variables (frame
# access, gc introspection, tracing, /proc, signal handlers) and releases the token once, to the harness's frame.
_BOOT = r"""
import ctypes, json, os, resource, sys, _thread, signal, _signal
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
del ctypes, json, resource


def sandbox(token_fd, result_fd):
    BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "pty.", "ctypes.", "_ctypes", "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_",
               "sys.monitoring")
    FRAME_ATTRS = ("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back")
    token = os.read(token_fd, 64)
    os.close(token_fd)
    getframe, ident, write, realpath, isdir = sys._getframe, _thread.get_ident, os.write, os.path.realpath, os.path.isdir
    state = {"harness": None, "inside": None}

    def guard(event, args):
        if state["inside"] == ident():
            return
        if event in ("r1.begin", "r1.passed"):
            state["inside"] = ident()
            try:
                caller = getframe(1)
            finally:
                state["inside"] = None
            if event == "r1.begin" and state["harness"] is None:
                state["harness"] = caller
                return
            if event == "r1.passed" and state["harness"] is not None and caller is state["harness"]:
                state["harness"] = False
                write(result_fd, token)
                return
            raise PermissionError("blocked in the code_tests sandbox: the harness's own events")
        if event == "sys._getframe":
            raise ValueError("blocked in the code_tests sandbox: frames")  # stdlib callers tolerate ValueError
        if event == "object.__getattr__" and args[1] in FRAME_ATTRS:
            raise PermissionError(f"blocked in the code_tests sandbox: {args[1]}")
        if event == "open" and isinstance(args[0], str | bytes):
            state["inside"] = ident()
            try:
                path = realpath(os.fsdecode(args[0]))
                bad = path.startswith("/proc") or isdir(path)
            finally:
                state["inside"] = None
            if bad:
                raise PermissionError(f"blocked in the code_tests sandbox: open {path}")
        if event == "import" and args[0] in ("signal", "_signal", "faulthandler", "gc"):
            raise PermissionError(f"blocked in the code_tests sandbox: import {args[0]}")
        if event.startswith(BLOCKED):
            raise PermissionError(f"blocked in the code_tests sandbox: {event}")

    return guard


def refuse(*args, **kwargs):
    raise PermissionError("blocked in the code_tests sandbox: signal handlers")


def harness():
    import builtins
    run, audit, copy = exec, sys.audit, dict
    pristine = copy(builtins.__dict__)
    solution = compile(open("solution.py").read(), "solution.py", "exec")
    tests = compile(open("tests.py").read(), "tests.py", "exec")
    for module in (signal, _signal):  # a handler would be called with the harness's frame
        module.signal = module.set_wakeup_fd = refuse
    sys.addaudithook(sandbox(cfg["token_fd"], cfg["result_fd"]))
    audit("r1.begin")
    namespace = {"__name__": "__main__", "__builtins__": copy(pristine)}
    run(solution, namespace)
    checks = copy(namespace)
    checks["__builtins__"] = copy(pristine)
    run(tests, checks)
    audit("r1.passed")


harness()
"""


def extract_code(completion: str) -> str:
    """The last ```python block, else the <answer> content, else the completion itself."""
    blocks = _BLOCK.findall(completion)
    if blocks:
        return blocks[-1]
    answer = _ANSWER.findall(completion)
    return answer[-1] if answer else completion


def run_tests(code: str, tests: str, timeout_seconds: float = 5.0, cpu_seconds: int = 5, memory_mb: int = 256,
              require_netns: bool = False) -> tuple[bool, str]:
    """(passed, why) for one solution: a pass is the run's token, written by the harness after the last test."""
    import json

    work = Path(tempfile.mkdtemp(prefix="r1-code-"))
    token = secrets.token_hex(16).encode()
    token_r, token_w = os.pipe()
    result_r, result_w = os.pipe()
    try:
        (work / "solution.py").write_text(code)
        (work / "tests.py").write_text(tests)
        os.write(token_w, token)
        os.close(token_w)
        cfg = json.dumps({"memory_mb": memory_mb, "cpu_seconds": cpu_seconds, "require_netns": require_netns,
                          "token_fd": token_r, "result_fd": result_w})
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT, cfg], cwd=work, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": os.defpath},
                                start_new_session=True, pass_fds=(token_r, result_w))
        os.close(token_r)
        os.close(result_w)
        token_r = result_w = -1
        try:
            _, err = proc.communicate(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return False, f"timed out after {timeout_seconds:g} s"
        reported = _read_all(result_r)
        tail = err[-2000:].decode(errors="replace").strip()
        if reported == token:
            return True, "passed"
        if proc.returncode == 3 and require_netns:
            return False, "no network namespace available (require_netns)"
        if proc.returncode < 0:
            return False, f"killed by {signal.Signals(-proc.returncode).name}"
        if proc.returncode == 0:
            return False, "exited before the tests finished"
        return False, tail.splitlines()[-1] if tail else f"exit {proc.returncode}"
    finally:
        for fd in (token_r, result_w, result_r):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)  # every writer has exited: what is there is all there is
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


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
