"""Where metrics go: a tiny protocol, MLflow, the console, or nowhere.

The trainer only calls `log_metrics(dict, step)` and `log_params(dict)`; the stage that owns the MLflow run decides which
logger to pass (grpo never starts or ends runs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass


class ConsoleLogger:
    """Prints one line per logged step; keeps every logged dict in `history` (handy in tests and notebooks)."""

    def __init__(self, keys: tuple[str, ...] | None = None, printer=print):
        self.keys = keys
        self.printer = printer
        self.history: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append((step, dict(metrics)))
        shown = {k: v for k, v in metrics.items() if self.keys is None or k in self.keys}
        self.printer(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def log_params(self, params: dict) -> None:
        self.printer("params: " + " ".join(f"{k}={v}" for k, v in params.items()))


class MLflowLogger:
    """Logs to the active MLflow run (or the given run id). MLflow metric names may not hold some characters."""

    def __init__(self, run_id: str | None = None, prefix: str = ""):
        import mlflow

        self.mlflow = mlflow
        self.run_id = run_id
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}
        if self.run_id is None:
            self.mlflow.log_metrics(clean, step=step)
        else:
            self.mlflow.MlflowClient().log_batch(
                self.run_id,
                metrics=[self.mlflow.entities.Metric(k, v, _now_ms(), step) for k, v in clean.items()],
            )

    def log_params(self, params: dict) -> None:
        flat = {f"{self.prefix}{k}": str(v)[:6000] for k, v in params.items()}
        if self.run_id is None:
            self.mlflow.log_params(flat)
        else:
            client = self.mlflow.MlflowClient()
            client.log_batch(self.run_id, params=[self.mlflow.entities.Param(k, v) for k, v in flat.items()])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
