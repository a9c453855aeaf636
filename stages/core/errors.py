"""How a command ends when it does not finish: one place for the `r1` CLI (`flows/cli.py`) and a stage's own process
(`stages/entry.py`, under torchrun, DeepSpeed, Slurm or a Kubernetes pod), so both say the same thing.

| what ended it | what the user sees | exit code |
| --- | --- | --- |
| the tool's own error (a class defined in our packages: bad input, a refusal) | one message | 2 |
| anything else | a short line and the file holding the traceback (`--debug`: the traceback itself) | 1 |
| Ctrl-C (SIGINT) or SIGTERM | one line | 130, for both (the shell's code for Ctrl-C) |
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

OWN_PACKAGES = ("stages", "grpo", "flows", "rewards")  # an exception class defined here is an error raised on purpose
EXIT_UNEXPECTED, EXIT_OWN_ERROR, EXIT_INTERRUPTED = 1, 2, 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, as an exception; its text is the one line the user sees (what stopped, what was kept)."""


def raise_on_signals() -> dict:
    """SIGINT (Ctrl-C) and SIGTERM raise `Interrupted` in the main thread, so a run ends its MLflow run KILLED and
    keeps its checkpoints on either. Set explicitly: a process started in the background by a non-interactive shell
    (`nohup r1 pipeline &`, a CI script) inherits SIGINT ignored and would never see a Ctrl-C; SIGTERM (what `kill`,
    torchrun, Slurm and Kubernetes send) would otherwise end the process without any cleanup. No-op off the main
    thread (only it can set handlers). Returns the handlers it replaced (for `restore_signals`)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        if not _pending:
            _pending.append(f"interrupted ({signal.Signals(signum).name})")
        # again every second (RAISE_AGAIN times) until caught (`handled`): raised inside a finaliser or a weakref
        # callback (the garbage collector runs them anywhere), the exception is printed as "ignored" and the run
        # would go on
        signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
        raise Interrupted(_pending[0])

    def again(signum, frame):
        if len(_pending) > RAISE_AGAIN:  # caught by code that is not ours (a library's cleanup): leave it be
            handled()
        elif _pending:
            _pending.append(_pending[0])
            raise Interrupted(_pending[0])

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGALRM, again)
    return before


def restore_signals(before: dict) -> None:
    for sig, handler in before.items():
        signal.signal(sig, handler)


_pending: list[str] = []  # the interrupt raised and not yet caught, once per time it was raised
RAISE_AGAIN = 3  # times, a second apart


def handled() -> None:
    """Where an interrupt is caught and acted on (a run marked KILLED, a launch stopped, the line printed): stop
    raising it again."""
    _pending.clear()
    with contextlib.suppress(ValueError, OSError):
        signal.setitimer(signal.ITIMER_REAL, 0)


def is_interrupt(e: BaseException) -> bool:
    """Ctrl-C/SIGTERM however it arrived: ours, Python's default KeyboardInterrupt, or Prefect's TerminationSignal
    (Prefect turns SIGTERM into it inside a flow run)."""
    return isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TerminationSignal"


def is_own(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in OWN_PACKAGES


def outcome(e: BaseException) -> tuple[int, str]:
    """(exit code, the message to print) for an exception that ends a command."""
    if is_interrupt(e):
        text = str(e) if isinstance(e, Interrupted) else "interrupted"
        return EXIT_INTERRUPTED, text
    if is_own(e):
        return EXIT_OWN_ERROR, str(e)
    return EXIT_UNEXPECTED, (f"unexpected error: {type(e).__name__}: {_cut(str(e))}\nfull traceback: "
                             f"{save_traceback(e)} (or rerun with r1 --debug ...)")


def _cut(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def save_traceback(e: BaseException) -> str:
    """Write the traceback to `.r1/logs/` (else the temp folder); returns the file's path."""
    text = "".join(traceback.format_exception(e))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{id(e):x}.txt"
    for folder in (Path(".r1/logs"), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return str(folder / name)
        except OSError:
            continue
    return "(could not be written)"
