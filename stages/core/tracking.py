"""MLflow conventions shared by every stage: one run per stage, nested under the pipeline's run, tagged.

Tags: `r1.stage` (stage name), `r1.pipeline_run_id` (the parent run), `r1.recipe` (recipe name). Artifacts: `model/`
(save_pretrained directory that is also an MLflow pyfunc model), `data/`, a `samples` table and `curves.png`. Params:
the stage config flattened to dotted keys. Inputs: the data sets a stage trained or was evaluated on. Every stage run
samples system metrics (`system/...`: CPU, memory, GPU when present).
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from pathlib import Path

from stages.core import pyfunc_model
from stages.core.recipe import TrackingConfig

log = logging.getLogger(__name__)

STAGE_TAG = "r1.stage"
PIPELINE_TAG = "r1.pipeline_run_id"
RECIPE_TAG = "r1.recipe"
EVALUATION = "evaluation"  # the r1.stage of a run that re-evaluates a finished stage's model under new eval settings
EVALUATES_TAG = "r1.evaluates"  # that stage's name (and r1.evaluated_run its run)
PLOT_TAG = "r1.plot"
# MLflow 3 opens an experiment tagged this way on its runs table (otherwise on the GenAI traces overview)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
        return mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # made before the tag existed
        for k, v in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
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
    # MLflow's monitor says at INFO when it starts, stops, and that it skips GPUs: noise on every stage
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_run_id,
                          nested=parent_run_id is not None, tags=tags, log_system_metrics=True) as run:
        log_params(params)
        yield run


def log_params(params: dict[str, str]) -> None:
    import mlflow

    items = [(k, str(v)[:6000]) for k, v in params.items()]  # MLflow's value limit
    for i in range(0, len(items), 100):  # and its batch limit
        mlflow.log_params(dict(items[i : i + 100]))



# ---- what a run shows beyond metrics: its model as a pyfunc, its data sets, its curves

PYFUNC_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "tokenizers", "pandas")
CURVES = {"reward/mean": "reward", "accuracy": "accuracy", "kl": "KL to the reference",
          "completion_length/mean": "completion length (tokens)", "sft/loss": "SFT loss"}


def make_pyfunc(model_dir: Path, run_id: str | None = None, artifact_path: str = "model") -> None:
    """Make a `save_pretrained` folder an MLflow pyfunc model in place (MLmodel, code/, pinned requirements), so
    `mlflow.pyfunc.load_model` and `mlflow models serve` take it; the Hugging Face files stay where later stages read
    them, and the loader (stages/core/pyfunc_model.py) reads them from there. With `run_id`, the run lists it as its
    logged model at `artifact_path` (the runs table's Models column)."""
    import importlib.metadata
    import json
    import shutil
    import tempfile
    import warnings

    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_MODELS

    signature = ModelSignature(Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string", "completion")]),
                               ParamSchema([ParamSpec("max_new_tokens", "long", pyfunc_model.PARAMS["max_new_tokens"]),
                                            ParamSpec("temperature", "double", pyfunc_model.PARAMS["temperature"])]))
    # pinned to what trained it; a local label (torch's +cpu) is dropped: PyPI has no such build
    requirements = [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in PYFUNC_REQUIREMENTS]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # an input example would cost a model load and a generation per stage; the signature says it all
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        staged = Path(tmp) / "pyfunc"
        info = Model(run_id=run_id, artifact_path=artifact_path)
        # (the first save in a process scans every installed package to check the pins: a second or two, once)
        mlflow.pyfunc.save_model(staged, loader_module=pyfunc_model.LOADER_MODULE, code_paths=[pyfunc_model.__file__],
                                 pip_requirements=requirements, signature=signature, mlflow_model=info)
        for f in staged.iterdir():
            if (model_dir / f.name).is_dir():  # a resumed stage writes into the same folder again
                shutil.rmtree(model_dir / f.name)
            shutil.move(str(f), model_dir / f.name)
    if run_id is not None:
        mlflow.MlflowClient().set_tag(run_id, MLFLOW_LOGGED_MODELS, json.dumps([info.get_tags_dict()]))


def log_dataset(rows: list[dict], name: str, source: str, context: str) -> None:
    """`rows` as an input of the active run (name, source URI, content digest; context `training`, `evaluation`, ...):
    the runs table's Dataset column, and the same digest wherever the same data is used again."""
    import json

    import mlflow
    import pandas as pd

    def cell(v):
        return v if v is None or isinstance(v, str | int | float | bool) else json.dumps(v, sort_keys=True, default=str)

    frame = pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in rows])
    # integer columns as doubles, as MLflow's schema inference advises (it warns on each integer column: an integer
    # cannot be missing, and synthesized rows' `length` is missing from general rows)
    frame = frame.astype({c: "float64" for c in frame.select_dtypes("integer").columns})
    mlflow.log_input(mlflow.data.from_pandas(frame, source=_uri_source(source), name=name), context=context)


def data_source_uri(src, split: str) -> str:
    """Where rows come from, as a dataset source: `generated:<task>?max_digits=N&split=S` for a task family (a
    DataSource or the base model's config), else `path:<file>` or `hub:<id>`."""
    if getattr(src, "source", None) in ("path", "hub"):  # the base model's `source` is build/pretrained: generated
        return f"{src.source}:{src.path}"
    return f"generated:{src.task}?max_digits={src.max_digits}&split={split}"


def _uri_source(uri: str):
    """A dataset source that is just a URI (MLflow resolves none for runs:/ or generated data)."""
    from mlflow.data.dataset_source import DatasetSource

    class URISource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs):
            raise NotImplementedError(f"load {self.uri} with the pipeline's own readers")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            return cls(raw_source)

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, d: dict):
            return cls(d["uri"])

    return URISource(uri)


def log_curves(run_id: str, keys=tuple(CURVES), artifact: str = "curves.png") -> str | None:
    """One PNG of the run's logged curves among `keys` (side by side, against step), tagged `r1.plot` with its URI;
    read back from MLflow, so a resumed run's plot holds the steps it took over. None when no curve was logged."""
    import mlflow
    from matplotlib.figure import Figure

    client = mlflow.MlflowClient()
    curves = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig = Figure(figsize=(4 * len(curves), 3), layout="constrained")
    for ax, (key, points) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items(), strict=True):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
        ax.set_title(CURVES.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    client.log_figure(run_id, fig, artifact)
    uri = f"runs:/{run_id}/{artifact}"
    client.set_tag(run_id, PLOT_TAG, uri)
    return uri
