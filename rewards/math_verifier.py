"""math-verify in worker processes, with a hard deadline per comparison.

Why processes: math-verify's own timeout is `signal.alarm`, which works only in the main thread (a Prefect task or a
threaded caller gets an error, i.e. every answer scored 0) and cannot interrupt a hang inside C code. Here each worker
is a plain `python math_verifier.py` subprocess (no multiprocessing re-import of the caller's `__main__`) that reads JSON
lines `[id, prediction, gold]` and answers `[id, verdict, seconds]`. Inside the worker math-verify still uses its own
alarm; the parent kills a worker that overruns the deadline, scores that pair 0 with a warning, and starts a fresh one.
Several workers run in parallel when asked, which is the fix when math-verify is the bottleneck of a big batch.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import selectors
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take a while


class _Worker:
    def __init__(self, timeout_s: float):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), "--worker", str(timeout_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )
        self.ready = False
        self.job: tuple[int, float] | None = None  # (pair index, deadline)

    def send(self, idx: int, pred: str, gold: str, deadline: float) -> None:
        self.proc.stdin.write(json.dumps([idx, pred, gold]) + "\n")
        self.proc.stdin.flush()
        self.job = (idx, deadline)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired) as e:  # already gone, or stuck in the kernel
            log.debug("math-verify worker kill: %s", e)


class MathVerifier:
    """`verify_many(pairs)` -> one bool per (prediction, gold) pair; a pair past `timeout_s` counts False, logged."""

    def __init__(self, workers: int = 1, timeout_s: float = 5.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s})")
        self.n_workers, self.timeout_s = workers, timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], bool] = {}
        atexit.register(self.close)

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def verify_many(self, pairs: list[tuple[str, str]]) -> list[bool]:
        with self._lock:
            todo = sorted({p for p in pairs if p not in self._cache})
            if todo:
                self._cache.update(zip(todo, self._run(todo)))
                if len(self._cache) > 100_000:
                    self._cache.clear()
            return [self._cache.get(p, False) for p in pairs]

    def _spawn(self) -> _Worker:
        w = _Worker(self.timeout_s)
        line = _readline(w.proc, time.monotonic() + STARTUP_TIMEOUT_S)
        if line is None or line.strip() != "ready":
            w.kill()
            raise RuntimeError("math-verify worker failed to start (is math-verify installed in this interpreter?)")
        w.ready = True
        return w

    def _run(self, todo: list[tuple[str, str]]) -> list[bool]:
        results: list[bool] = [False] * len(todo)
        queue = list(range(len(todo)))[::-1]
        self._workers = [w for w in self._workers if w.proc.poll() is None]
        while len(self._workers) < min(self.n_workers, len(todo)):
            self._workers.append(self._spawn())
        sel = selectors.DefaultSelector()
        for w in self._workers:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        pending = 0

        def dispatch(w: _Worker) -> None:
            nonlocal pending
            if queue:
                i = queue.pop()
                pending += 1
                try:
                    w.send(i, *todo[i], time.monotonic() + self.timeout_s)
                except OSError:  # it died since we last looked (broken pipe)
                    w.job = (i, 0.0)
                    drop(w, "worker exited")

        def drop(w: _Worker, why: str) -> None:
            """Kill a worker that overran or died; its pair scores 0; a fresh one only if work is left."""
            nonlocal pending
            log.warning("math-verify %s on %r; scored 0", why, shorten(todo[w.job[0]][0]))
            sel.unregister(w.proc.stdout)
            w.kill()
            self._workers.remove(w)
            pending -= 1
            if queue:
                fresh = self._spawn()
                self._workers.append(fresh)
                sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
                dispatch(fresh)

        for w in self._workers:
            dispatch(w)
        try:
            while pending:
                next_deadline = min(w.job[1] for w in self._workers if w.job)
                for key, _ in sel.select(timeout=max(0.0, next_deadline - time.monotonic())):
                    w = key.data
                    line = w.proc.stdout.readline()
                    if not line:  # the worker died (e.g. out of memory)
                        drop(w, "worker exited")
                        continue
                    idx, verdict, secs = json.loads(line)
                    results[idx] = bool(verdict)
                    if verdict is None:
                        log.warning("math-verify timed out after %.1fs on %r; scored 0", secs, shorten(todo[idx][0]))
                    w.job = None
                    pending -= 1
                    dispatch(w)
                now = time.monotonic()
                for w in [w for w in self._workers if w.job and now >= w.job[1]]:
                    drop(w, f"gave no verdict within {self.timeout_s}s (worker killed)")
        except BaseException:
            self.close()  # a half-read protocol cannot be resumed
            raise
        finally:
            sel.close()
        return results


def shorten(text: str, limit: int = 120) -> str:
    # not rewards.parsing.shorten: this file also runs as a bare script (the worker), without the package on the path
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"


def _readline(proc: subprocess.Popen, deadline: float) -> str | None:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            return proc.stdout.readline()
        return None
    finally:
        sel.close()


_DEFAULT: dict[tuple[int, float], MathVerifier] = {}
_DEFAULT_LOCK = threading.Lock()


def shared_verifier(workers: int = 1, timeout_s: float = 5.0) -> MathVerifier:
    """One long-lived verifier per (workers, timeout), so worker start-up is paid once per process."""
    with _DEFAULT_LOCK:
        key = (workers, timeout_s)
        if key not in _DEFAULT:
            _DEFAULT[key] = MathVerifier(workers, timeout_s)
        return _DEFAULT[key]


def _serve(timeout_s: float) -> None:
    """Worker loop: one JSON line in, one out. verdict is true/false, or null when math-verify's own alarm fired."""
    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure; the parent reports what matters
    from math_verify import parse, verify

    per_call = max(1, math.ceil(timeout_s))  # math-verify's alarm takes whole seconds
    print("ready", flush=True)
    for line in sys.stdin:
        idx, pred, gold = json.loads(line)
        t = time.monotonic()
        verdict = None
        try:
            g = parse(_as_math(gold), parsing_timeout=per_call)
            p = parse(_as_math(pred), parsing_timeout=per_call)
            verdict = bool(g and p and verify(g, p, timeout_seconds=per_call))
        except Exception:  # noqa: BLE001 - anything math-verify raises on a model's text is a failed match
            verdict = False
        secs = time.monotonic() - t
        if not verdict and secs >= per_call:
            verdict = None
        print(json.dumps([idx, verdict, round(secs, 3)]), flush=True)


def _as_math(s: str) -> str:
    """math-verify finds LaTeX inside delimiters; a bare `\\frac{1}{2}` or `x^2` is wrapped so that it is found."""
    if "$" in s or "\\(" in s or "\\[" in s or "\\boxed" in s:
        return s
    return f"${s}$"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _serve(float(sys.argv[2]))
