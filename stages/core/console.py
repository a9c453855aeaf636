"""What a run prints, owned here: the logging setup (called by the CLI, the flows and stage processes), the stage
start/end lines, and progress: a bar per long loop on a terminal, a step line every N steps or ~30 s otherwise.

Levels: `quiet` shows warnings and the stage start/end lines; `normal` adds our INFO lines; `verbose` our DEBUG lines.
Third-party loggers stay at WARNING in every mode (HTTP requests, MLflow's database setup, ...), their download and
weight-loading bars are off, and a warning is printed once however many times (or ways) it is raised.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from typing import Literal

Mode = Literal["quiet", "normal", "verbose"]
OURS = ("flows", "stages", "grpo", "rewards")
STAGE_LOG = "r1"  # the stage start/end lines: shown in every mode
STEP_LINE_SECONDS = 30.0
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
# set before the libraries are imported (each reads its flag once); a user's own value wins
QUIET_LIBRARIES = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_CONFIGURE_LOGGING": "false",  # else MLflow adds its own handler at import, past this setup
    # our loggers also go to the Prefect UI (the task run's logs); outside a flow run they stay local, silently
    "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join((STAGE_LOG, *OURS)), "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
MODE_ENV = "R1_CONSOLE"  # the mode, for flow runs and stage processes this process starts
# loggers that may carry a library's own handler: their records would print twice (theirs and ours)
OWN_HANDLERS = ("mlflow", "transformers", "datasets", "prefect")

_mode: Mode = "normal"
stage_log = logging.getLogger(STAGE_LOG)


class OncePerMessage(logging.Filter):
    """Drops a warning whose text was printed before: a library that both logs and `warnings.warn`s the same thing,
    or a warning raised at every step, prints one line."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        text = re.sub(r"^\w*Warning: ", "", record.getMessage().strip())
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


class ConsoleHandler(logging.StreamHandler):
    """stderr, through tqdm.write while a bar is drawn (a log line then does not break the bar). The stream is
    whatever `sys.stderr` is when a record is written, not when the handler was made: a caller that redirected
    stderr for a while (a CLI test runner, pytest's capture) and closed it leaves no dead stream behind."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; stderr wins
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not interactive():
            return super().emit(record)
        try:
            from tqdm import tqdm  # lazy: only when a terminal shows bars

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 -- logging must never raise
            self.handleError(record)


class CpuFallbackNotice(logging.Filter):
    """DeepSpeed warns "Setting accelerator to CPU ... unable to detect" at import. On a machine with no NVIDIA driver
    there is no GPU to miss and the line is noise; where a driver exists it may be a real problem, and it stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU") or os.path.exists("/proc/driver/nvidia")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings` through logging: one line (`Category: message`), no source line, deduplicated with the rest."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def setup(mode: Mode | None = None) -> None:
    """Configure logging for this process; idempotent. `mode` None: the one the launching process chose (R1_CONSOLE),
    else normal. Flows call it again after Prefect's import has configured its own loggers."""
    global _mode
    mode = mode or os.environ.get(MODE_ENV, "normal")
    if mode not in ("quiet", "normal", "verbose"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected quiet, normal or verbose")
    _mode = os.environ[MODE_ENV] = mode
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)
    if mode == "quiet":  # Prefect sets its loggers' level from this when it is imported
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if "transformers" in sys.modules:  # already imported: its flag was read
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    root = logging.getLogger()
    for h in list(root.handlers):  # ours from an earlier call, basicConfig's, Prefect's (not pytest's capture)
        if type(h) in (ConsoleHandler, logging.StreamHandler) or type(h).__name__ == "PrefectConsoleHandler":
            root.removeHandler(h)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(OncePerMessage())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    ours = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[mode]
    for name in OURS:
        logging.getLogger(name).setLevel(ours)
    stage_log.setLevel(logging.INFO)
    for name in OWN_HANDLERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if not type(h).__name__.startswith("API"):  # Prefect's API handler sends run logs to the UI: keep it
                lib.removeHandler(h)
        lib.setLevel(logging.WARNING)
        lib.propagate = True
    # "Beginning flow run 'tiny · pipeline · ...'" and its end state; a task's own state lines repeat the stage lines
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING if mode == "quiet" else logging.INFO)
    logging.getLogger("prefect.task_runs").setLevel(logging.INFO if mode == "verbose" else logging.WARNING)
    deepspeed = logging.getLogger("DeepSpeed")  # its own handler, added at its import: a logger filter sees every record
    if not any(isinstance(f, CpuFallbackNotice) for f in deepspeed.filters):
        deepspeed.addFilter(CpuFallbackNotice())
    warnings.showwarning = _show_warning


def interactive() -> bool:
    """Progress bars: stderr is a terminal and the run is not quiet. Otherwise loops log step lines."""
    return _mode != "quiet" and sys.stderr.isatty()


# ---- stage start/end lines


def ui_address(tracking) -> str | None:
    """The MLflow UI over a recipe's store: the tracking server itself, else `tracking.ui` (None: not known)."""
    return tracking.uri if tracking.uri.startswith(("http://", "https://")) else tracking.ui


def run_url(ui: str | None, experiment_id: str, run_id: str) -> str | None:
    """The run's page in an MLflow UI at `ui`, if one is known."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if ui else None


def metrics_text(metrics: dict[str, float]) -> str:
    """The held-out evaluation in a few words: pass@1 0.672 · greedy 0.703 · format 0.951 · language 1.000."""
    shown = (("eval/pass_at_1", "pass@1"), ("eval/greedy_accuracy", "greedy"), ("eval/format_rate", "format"),
             ("eval/language_consistency", "language"))
    return " · ".join(f"{label} {metrics[k]:.3f}" for k, label in shown if k in metrics)


def stage_started(name: str, run_id: str, workdir) -> None:
    stage_log.info("▶ %s started · MLflow run %s · work dir %s", name, run_id[:8], workdir)


def stage_finished(name: str, seconds: float, metrics: dict[str, float], url: str | None) -> None:
    parts = [f"■ {name} finished in {duration(seconds)}", metrics_text(metrics), url or ""]
    stage_log.info(" · ".join(p for p in parts if p))


def stage_reused(name: str, run_id: str, metrics: dict[str, float], url: str | None) -> None:
    parts = [f"■ {name} reused (unchanged since run {run_id[:8]})", metrics_text(metrics), url or ""]
    stage_log.info(" · ".join(p for p in parts if p))


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- progress


class StepLines:
    """A bar's stand-in when the output is not a terminal: `desc step 20/60 · reward 0.412 · 1.9 s/step · ETA 1m16s`
    at INFO every `every` steps or `seconds` seconds, and at the last step; none before `min_seconds` (a short loop
    says nothing). Same calls as tqdm: update, set_postfix, close."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: int | None = None,
                 seconds: float = STEP_LINE_SECONDS, logger: logging.Logger | None = None, unit: str = "step",
                 min_seconds: float = 0.0):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.every = every or max(1, total // 10)
        self.seconds, self.min_seconds = seconds, min_seconds
        self.log = logger or logging.getLogger("stages.progress")
        self.postfix: dict[str, object] = {}
        self.start_n, self.t0 = initial, time.monotonic()
        self.last_n, self.last_t = initial, self.t0

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = self.n >= self.total or self.n - self.last_n >= self.every or now - self.last_t >= self.seconds
        if due and now - self.t0 >= self.min_seconds:
            self.last_n, self.last_t = self.n, now
            self.log.info(self.line(now))

    def line(self, now: float) -> str:
        done = self.n - self.start_n
        per = (now - self.t0) / done if done else 0.0
        parts = [f"{self.desc} {self.unit} {self.n}/{self.total}"]
        parts += [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.postfix.items()]
        if done:
            parts += [f"{per:.2f} s/{self.unit}", f"ETA {duration(per * max(0, self.total - self.n))}"]
        return " · ".join(parts)

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step", every: int | None = None,
             min_seconds: float = 0.0):
    """A tqdm bar on a terminal; step lines through logging otherwise; nothing when `enabled` is False."""
    from tqdm.auto import tqdm  # lazy: `r1 validate` starts fast

    if enabled and interactive():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    if enabled:
        return StepLines(total, desc, initial, every=every, unit=unit, min_seconds=min_seconds)
    return tqdm(total=total, initial=initial, disable=True)


def progress_iter(items, desc: str, enabled: bool = True, unit: str = "batch"):
    """Iterate `items` with `progress` around it."""
    items = list(items)
    # evaluation is short: a line per ~30 s, none at all when it takes less
    bar = progress(len(items), desc, enabled, unit=unit, every=len(items), min_seconds=STEP_LINE_SECONDS)
    for x in items:
        yield x
        bar.update(1)
    bar.close()


class StepLogger:
    """A trainer's metric logger that also reports progress (for loops whose bar lives where we do not: the GRPO
    trainer). Forwards every call; each logged step moves `bar` to that step with reward, accuracy and KL."""

    KEYS = (("reward/mean", "reward"), ("accuracy", "accuracy"), ("kl", "kl"))

    def __init__(self, inner, bar: StepLines):
        self.inner, self.bar = inner, bar

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        self.bar.set_postfix({label: float(metrics[k]) for k, label in self.KEYS if k in metrics})
        self.bar.update(step - self.bar.n)

    def log_params(self, params: dict) -> None:
        self.inner.log_params(params)
