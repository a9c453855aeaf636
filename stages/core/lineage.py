"""Where a stage's work comes from and where it goes in MLflow: its stage key, its inputs (given, or the newest
finished upstream run), the finished runs a pipeline reuses, and the registered model a stage leaves.

Two keys: the stage key names the training (config, inputs, code, data content), the eval key names a held-out
evaluation of that training (the stage key plus the evaluation settings). New eval settings re-evaluate a finished
stage's model; they never retrain it.

mlflow is imported inside functions: the pipeline flows import this module, and `r1 validate` must start fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

from stages.core import tracking
from stages.core.configs import DataSource
from stages.core.distributed import REPO_ROOT
from stages.core.recipe import Recipe

OUTPUTS_TAG = "r1.outputs"
KEY_TAG = "r1.stage_key"
EVAL_KEY_TAG = "r1.eval_key"
HEADLINE_METRIC = "eval/pass_at_1"  # a run that logged it has a held-out evaluation to redo under new settings
MODEL_ALIAS = "current"
RUN_ID = re.compile(r"[0-9a-f]{32}")
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")


class StageInputError(ValueError):
    """A stage input that is missing or cannot be resolved."""


def stage_key(name: str, cfg: BaseModel, inputs: dict[str, str], recipe: Recipe) -> str:
    """Identity of a stage's training: its config, its inputs, the prompt template and seed, the code that runs it and
    the content of the local data it reads. Not the evaluation settings (see `eval_key`)."""
    blob = json.dumps({"stage": name, "cfg": cfg.model_dump(mode="json"), "inputs": inputs,
                       "template": recipe.prompt.template, "language": recipe.prompt.target_language, "seed": recipe.seed, "code": code_version(),
                       "data": data_digests(name, cfg, inputs, recipe)}
                      # style chat: the chat template and system turn make the prompts (template keys stay as they were)
                      | ({"chat": recipe.prompt.system} if recipe.prompt.style == "chat" else {}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def eval_key(key: str, recipe: Recipe) -> str:
    """Identity of a held-out evaluation of the training `key`: the eval settings and the held-out problems' family."""
    blob = json.dumps({"stage_key": key, "eval": recipe.eval.model_dump(mode="json"),
                       "heldout": {"task": recipe.base_model.task, "max_digits": recipe.base_model.max_digits}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version() -> str:
    """The package version, plus the git commit when the code runs from a checkout.

    No `+dirty`: a dirty flag says the tree differs from the commit but not how, so two different edits would share a
    key (a wrong reuse), while a digest of the uncommitted diff would change every key at each edit of a test or doc.
    Commit what you train with."""
    commit = _git_commit()
    version = metadata.version("r1-pipeline")
    return f"{version}+{commit}" if commit else version


@functools.cache
def _git_commit() -> str | None:
    if not (REPO_ROOT / ".git").exists():  # an installed package: not a checkout (nor inside someone else's repo)
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5,
                             check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, or stuck
        return None
    return out.stdout.strip()


def data_digests(name: str, cfg: BaseModel, inputs: dict[str, str], recipe: Recipe) -> dict[str, str]:
    """sha256 of each local data set the stage reads, by field: its config's data sources with source=path, and
    inputs given as local paths. Hub ids and runs:/ URIs are named by their string (a run's artifacts never change)."""
    out = {field: path_digest(src.path) for field, src in _data_sources(cfg, name) if src.source == "path"}
    if name == "cold_start_sft" and cfg.data is None and cfg.prompt_data is None:
        src = recipe.r1_zero.data  # its prompts come from the r1_zero section, outside its own config
        out["r1_zero.data"] = path_digest(src.path) if src.source == "path" else src.model_dump_json()
    for k, v in inputs.items():
        if not v.startswith(MLFLOW_SCHEMES) and Path(v).expanduser().exists():
            out[f"input.{k}"] = path_digest(v)
    return out


def _data_sources(cfg: BaseModel, prefix: str):
    """(dotted field, DataSource) for every data source in a config, nested ones included."""
    for field, value in cfg:
        if isinstance(value, DataSource):
            yield f"{prefix}.{field}", value
        elif isinstance(value, BaseModel):
            yield from _data_sources(value, f"{prefix}.{field}")


def path_digest(path: str | Path) -> str:
    """sha256 of a file's content, or of a folder's files (their relative paths and contents, in sorted order)."""
    p = Path(path).expanduser().resolve()
    if p.is_file():
        return file_digest(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


@functools.cache  # per (path, size, mtime) within a process: a key is computed several times per stage
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- inputs

def finished_runs(recipe: Recipe, tag: str, value: str, max_results: int = 5) -> list:
    """FINISHED runs of the recipe's experiment whose tag `tag` equals `value`, newest first."""
    import mlflow

    tracking.setup(recipe.tracking)
    exp = mlflow.get_experiment_by_name(recipe.tracking.experiment)
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=max_results, output_format="list")


def latest_finished_run(recipe: Recipe, stage: str):
    """The newest FINISHED MLflow run of `stage` in the recipe's experiment, or None."""
    runs = finished_runs(recipe, tracking.STAGE_TAG, stage, max_results=1)
    return runs[0] if runs else None


def resolve_input(recipe: Recipe, inputs: dict | None, key: str, upstream: str, artifact: str | None = None) -> str:
    """inputs[key] if given (see `normalize_input`), else the `artifact` of the newest finished `upstream` run."""
    if inputs and inputs.get(key):
        return normalize_input(recipe, inputs[key], artifact or key)
    run = latest_finished_run(recipe, upstream)
    if run is None:
        raise StageInputError(
            f"no input {key!r}: give one (e.g. --input-{key} runs:/<id>/{artifact or key}) or run stage {upstream!r} "
            f"first; experiment {recipe.tracking.experiment!r} at {recipe.tracking.uri} has no finished {upstream} run")
    return f"runs:/{run.info.run_id}/{artifact or key}"


def normalize_input(recipe: Recipe, value: str, artifact: str) -> str:
    """An input as given by a user: a bare MLflow run id means that run's `artifact`; `models:/name@alias` (or
    `/version`) means the run behind that model version, so the stage key names the concrete model and a moved alias
    is a changed input. Anything else (runs:/ URIs, paths) is kept as is."""
    value = value.strip()
    if RUN_ID.fullmatch(value):
        return f"runs:/{value}/{artifact}"
    if not value.startswith("models:/"):
        return value
    import mlflow

    tracking.setup(recipe.tracking)
    client = mlflow.MlflowClient()
    ref = value.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except Exception as e:  # noqa: BLE001 -- MLflow raises several types for a missing model, alias or version
        raise StageInputError(f"input {value!r}: no such registered model version in {recipe.tracking.uri} ({e})"
                              ) from None
    return f"runs:/{version.run_id}/{artifact}" if version.run_id else value


def use_tracking_for(recipe: Recipe, *uris: str | None) -> None:
    """Point MLflow at the recipe's store when an input is an MLflow URI read before the stage's run opens."""
    if any(u and u.startswith(MLFLOW_SCHEMES) for u in uris):
        tracking.check_tracking(recipe.tracking)
        tracking.setup(recipe.tracking)


# ---- outputs

def record_outputs(recipe: Recipe, outputs: dict[str, str]) -> None:
    """Tag the stage's run with what it returned, so a later pipeline run with the same stage key can reuse it."""
    import mlflow

    tracking.setup(recipe.tracking)
    mlflow.MlflowClient().set_tag(outputs["run_id"], OUTPUTS_TAG, json.dumps(outputs))


def finished_run_with_key(recipe: Recipe, key: str):
    """A FINISHED run of this experiment whose stage key is `key` and whose outputs were recorded, or None."""
    return next((r for r in finished_runs(recipe, KEY_TAG, key) if OUTPUTS_TAG in r.data.tags), None)


def current_evaluation(recipe: Recipe, run) -> str | None:
    """For a finished stage run (one `finished_run_with_key` found), the id of the run that holds its held-out
    evaluation under the recipe's eval settings: `run` itself (same settings, or a stage with no evaluation), an
    evaluation run made earlier, or None when it is still to be made."""
    key = eval_key(run.data.tags[KEY_TAG], recipe)
    if run.data.tags.get(EVAL_KEY_TAG) == key or HEADLINE_METRIC not in run.data.metrics:
        return run.info.run_id
    earlier = finished_runs(recipe, EVAL_KEY_TAG, key, max_results=1)
    return earlier[0].info.run_id if earlier else None


def registered_model_name(recipe: Recipe, stage: str) -> str:
    return f"r1-{recipe.name}-{stage}"


def register_model(recipe: Recipe, stage: str, run_id: str, key: str) -> str:
    """Register the run's `model/` as a new version of `r1-<recipe>-<stage>` and point the alias `current` at it, so
    users and reruns can say `models:/r1-tiny-r1_zero@current`. Returns the version's URI."""
    import mlflow

    client = mlflow.MlflowClient()
    name = registered_model_name(recipe, stage)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"{stage} models of recipe {recipe.name}")
    source = client.get_run(run_id).info.artifact_uri + "/model"
    version = client.create_model_version(name, source=source, run_id=run_id, tags={KEY_TAG: key})
    client.set_registered_model_alias(name, MODEL_ALIAS, version.version)
    uri = f"models:/{name}/{version.version}"
    client.set_tag(run_id, "r1.registered_model", uri)
    return uri

