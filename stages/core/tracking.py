"""MLflow conventions shared by every stage: one run per stage, nested under the pipeline's run, tagged.

Tags: `r1.stage` (stage name), `r1.pipeline_run_id` (the parent run), `r1.recipe` (recipe name). Artifacts: `model/`
(save_pretrained directory), `data/`, and a `samples` table. Params: the stage config flattened to dotted keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from pathlib import Path

from stages.core.recipe import TrackingConfig

log = logging.getLogger(__name__)

STAGE_TAG = "r1.stage"
PIPELINE_TAG = "r1.pipeline_run_id"
RECIPE_TAG = "r1.recipe"
EVALUATION = "evaluation"  # the r1.stage of a run that re-evaluates a finished stage's model under new eval settings
EVALUATES_TAG = "r1.evaluates"  # that stage's name (and r1.evaluated_run its run)


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable file)."""


def check_tracking(cfg: TrackingConfig, timeout: float = 3.0) -> None:
    """Fail fast, naming the URI, before any model is loaded: an http server must answer, a sqlite file be writable."""
    uri = cfg.uri
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except Exception as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e}); start it or fix tracking.uri") from e
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        folder = db.parent if str(db.parent) else Path(".")
        if not folder.exists() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking.uri {uri}: folder {folder.resolve()} does not exist or is not writable")


def setup(cfg: TrackingConfig):
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(cfg.uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_location
        if location is None and cfg.uri.startswith("sqlite:///"):
            # next to the database, so a pipeline's store is one folder a user can move or delete
            location = (Path(cfg.uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    return exp.experiment_id


@contextlib.contextmanager
def stage_run(cfg: TrackingConfig, stage: str, params: dict[str, str], recipe_name: str,
              parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None):
    """An MLflow run for one stage; nested under `parent_run_id` when given."""
    import mlflow

    exp_id = setup(cfg)
    tags = {STAGE_TAG: stage, RECIPE_TAG: recipe_name, **(extra_tags or {})}
    if parent_run_id:
        tags[PIPELINE_TAG] = parent_run_id
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_run_id,
                          nested=parent_run_id is not None, tags=tags) as run:
        log_params(params)
        yield run


def log_params(params: dict[str, str]) -> None:
    import mlflow

    items = [(k, str(v)[:6000]) for k, v in params.items()]  # MLflow's value limit
    for i in range(0, len(items), 100):  # and its batch limit
        mlflow.log_params(dict(items[i : i + 100]))

