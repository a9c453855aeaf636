"""Supervising a launch: run the launcher, stream its output, kill it on timeout or interrupt, and find the error of
the rank that failed first in torchrun's per-rank logs."""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flows.launch.spec import REPO_ROOT, LaunchError, LaunchSpec
from stages.core import errors


def _child_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)
    return env


def stream(cmd: list[str], spec: LaunchSpec, log: Callable[[str], None], follow: Path | None = None,
            follow_glob: str = "", on_abort: Callable[[list[str]], None] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, passing each output line to `log` as it comes; returns (exit code, last lines).

    follow: also tail files matching `follow_glob` there (the Slurm job's output file) while waiting.
    on_abort: called with the output so far when the launch is killed (timeout, interrupt), e.g. to scancel a job.
    """
    tail: collections.deque[str] = collections.deque(maxlen=400)
    log(f"$ {shlex.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace", env=_child_env(spec), start_new_session=True)

    aborted = threading.Event()

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if not aborted.is_set():  # after an interrupt, the one line the user sees is the launching process's
                log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    offsets: dict[Path, int] = {}
    try:
        while proc.poll() is None:
            if follow is not None:
                _follow_files(follow, follow_glob, offsets, tail, log)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"launch timed out after {spec.timeout:g} s: {shlex.join(cmd)}\n"
                                  + "\n".join(list(tail)[-20:]))
            time.sleep(0.2 if follow is None else 2.0)
    except BaseException as e:  # timeout, Ctrl-C, a cancelled Prefect task: the ranks must not outlive the launch
        if not isinstance(e, Exception):
            aborted.set()
            errors.handled()  # caught here, raised again below once the ranks are gone
        _kill(proc)
        if on_abort is not None:
            on_abort(list(tail))
        reader.join(timeout=5)
        raise
    reader.join(timeout=10)
    if follow is not None:
        _follow_files(follow, follow_glob, offsets, tail, log)
    return proc.returncode, list(tail)


def _follow_files(folder: Path, pattern: str, offsets: dict, tail, log) -> None:
    for f in sorted(folder.glob(pattern)):
        with f.open("r", errors="replace") as fh:
            fh.seek(offsets.get(f, 0))
            chunk = fh.read()
            offsets[f] = fh.tell()
        for line in chunk.splitlines():
            tail.append(line)
            log(line)


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (torchrun forwards it to the ranks), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]: ?")
_ROOT_CAUSE = re.compile(r"Root Cause.*?local_rank:\s*(\d+)\)", re.DOTALL)
_FAILURE = re.compile(r"local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
# errors a rank gets because another one died: never the cause when a rank with another error exists
_SECONDARY = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer", "SIGTERM")


def traceback_tail(lines: list[str], max_lines: int = 60) -> str:
    """The last traceback in `lines` (rank prefixes removed), or the last lines when there is none."""
    clean = [_RANK_PREFIX.sub("", ln) for ln in lines]
    starts = [i for i, ln in enumerate(clean) if "Traceback (most recent call last)" in ln]
    # torchrun's own ChildFailedError traceback comes last; prefer the one before it when there is one
    own = [i for i in starts if any("ChildFailedError" in ln for ln in clean[i:i + 40])]
    starts = [i for i in starts if i not in own] or starts
    if not starts:
        return "\n".join(clean[-30:])
    block = clean[starts[-1]:]
    # the exception line: the first one after the frames that is not indented
    end = next((j for j, ln in enumerate(block[1:], 1) if ln.strip() and not ln.startswith((" ", "\t"))), len(block) - 1)
    block = block[:end + 1]
    return "\n".join(block if len(block) <= max_lines else block[:3] + ["  ..."] + block[-(max_lines - 4):])


def torchrun_failure(stage: str, code: int, output: list[str], log_dir: Path, under: str = "torchrun",
                      max_ranks: int = 3) -> str:
    """The failing ranks' errors (error.json, else the traceback in stderr.log), the one that caused it first.

    torchrun names a root cause, but when one rank's crash makes the others fail in a collective ("Connection closed
    by peer") within one monitoring interval, it can name a victim; such secondary errors are put last.
    """
    text = "\n".join(output)
    ranks = _rank_dirs(log_dir)
    first: list[int] = []
    if m := _ROOT_CAUSE.search(text):
        first.append(int(m.group(1)))
    first += [int(r) for r, rc in _FAILURE.findall(text) if rc not in ("-15", "-9")]  # not killed by torchrun
    order = [k for lr in dict.fromkeys(first) for k in ranks if k[1] == lr]
    order += [k for k, d in sorted(ranks.items()) if "Traceback" in _read(d / "stderr.log")]
    several_nodes = len({run for run, _ in ranks}) > 1
    errors = []
    for key in dict.fromkeys(order):
        d = ranks[key]
        err = _error_json(d / "error.json") or _own_error(_read(d / "stderr.log"))
        if err is None and "Traceback" in _read(d / "stderr.log"):
            err = traceback_tail(_read(d / "stderr.log").splitlines())
        label = f"local rank {key[1]} of {key[0]}" if several_nodes else f"rank {key[1]}"
        errors.append((label, err))
    errors.sort(key=lambda e: e[1] is None or any(w in e[1] for w in _SECONDARY))  # stable: root cause first
    parts = [f"stage {stage} failed under {under} (exit {code}); logs in {log_dir}"]
    parts += [f"{label} error:\n{err or '(no traceback in its log)'}" for label, err in errors[:max_ranks]]
    if not errors:
        parts.append(traceback_tail(output))
    return "\n".join(parts)


_LOG_LINE = re.compile(r"^(\[\w+\]: )?\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _own_error(stderr: str) -> str | None:
    """The message a rank printed last when it exited on one of our own errors (stages/entry.py: no traceback, exit
    2): the lines after its last log line; None when it ended with a traceback or printed nothing after its logs."""
    lines = stderr.rstrip().splitlines()
    if not lines or "Traceback (most recent call last)" in stderr:
        return None
    last_log = max((i for i, ln in enumerate(lines) if _LOG_LINE.match(ln)), default=-1)
    message = [_RANK_PREFIX.sub("", ln) for ln in lines[last_log + 1:]]
    return "\n".join(message) if message else None


def _rank_dirs(log_dir: Path) -> dict[tuple[str, int], Path]:
    """(torchrun run folder, local rank) -> the rank's log folder in that run's last attempt; one run per node."""
    out: dict[tuple[str, int], Path] = {}
    for run in sorted(p for p in log_dir.glob("*") if p.is_dir()):
        attempts = sorted(run.glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
        for r in attempts[-1].iterdir() if attempts else []:
            if r.is_dir() and r.name.isdigit():
                out[(run.name, int(r.name))] = r
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _error_json(path: Path) -> str | None:
    """The traceback torch.distributed.elastic's @record wrote for a rank (None when the rank wrote none)."""
    try:
        data = json.loads(path.read_text())
        msg = data["message"]
        if isinstance(msg, dict):
            stack = msg.get("extraInfo", {}).get("py_callstack")
            return traceback_tail(stack.splitlines()) if stack else msg.get("message")
        return str(msg)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_result(stage: str, result_file: Path) -> dict:
    """The outputs rank 0 wrote (run id, artifact URIs)."""
    if not result_file.exists():
        raise LaunchError(f"stage {stage} finished but rank 0 wrote no result file ({result_file})")
    return json.loads(result_file.read_text())
