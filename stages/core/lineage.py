"""Where a stage's work comes from and where it goes in MLflow: its stage key, its inputs (given, or the newest
finished upstream run), the finished runs a pipeline reuses, and the registered model a stage leaves.

mlflow is imported inside functions: the pipeline flows import this module, and `r1 validate` must start fast.
"""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel

from stages.core import tracking
from stages.core.recipe import Recipe

OUTPUTS_TAG = "r1.outputs"
KEY_TAG = "r1.stage_key"
MODEL_ALIAS = "current"
RUN_ID = re.compile(r"[0-9a-f]{32}")
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:")


class StageInputError(ValueError):
    """A stage input that is missing or cannot be resolved."""


def stage_key(name: str, cfg: BaseModel | dict, inputs: dict[str, str], recipe: Recipe) -> str:
    """Identity of a stage's work: its config, its inputs, the prompt template and seed."""
    body = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    blob = json.dumps({"stage": name, "cfg": body, "inputs": inputs, "template": recipe.prompt.template,
                       "language": recipe.prompt.target_language, "eval": recipe.eval.model_dump(mode="json"),
                       "seed": recipe.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


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

