"""What every stage does around its own work: resolve inputs, open its MLflow run, keep a work directory, and finish
by saving, evaluating and logging its model.

The work directory is keyed by a hash of (stage, config, inputs), not by run id: a rerun of the same stage on the same
inputs finds the checkpoints or shards a killed run left, and resumes from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from stages import tracking
from stages.recipe import Recipe, flatten

log = logging.getLogger(__name__)


OUTPUTS_TAG = "r1.outputs"
KEY_TAG = "r1.stage_key"


class StageInputError(ValueError):
    """A stage input that is missing or cannot be resolved."""


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


RUN_ID = re.compile(r"[0-9a-f]{32}")


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


def stage_key(name: str, cfg: BaseModel | dict, inputs: dict[str, str], recipe: Recipe) -> str:
    """Identity of a stage's work: its config, its inputs, the prompt template and seed."""
    body = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    blob = json.dumps({"stage": name, "cfg": body, "inputs": inputs, "template": recipe.prompt.template,
                       "language": recipe.prompt.target_language, "eval": recipe.eval.model_dump(mode="json"),
                       "seed": recipe.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageContext:
    name: str
    recipe: Recipe
    run_id: str
    key: str
    workdir: Path
    inputs: dict[str, str]
    progress: bool
    main: bool = True  # rank 0 (or the only process): the one that writes to MLflow

    @property
    def logger(self):
        """Per-step metrics into the stage's run (a resumed attempt first takes over the killed one's steps)."""
        from stages.attempts import stage_logger

        return stage_logger(self.run_id)


@contextlib.contextmanager
def stage_context(recipe: Recipe, name: str, cfg: BaseModel, inputs: dict[str, str], parent_run_id: str | None,
                  progress: bool):
    """Open the stage's MLflow run (nested under the pipeline's) and its keyed work directory.

    On several ranks only rank 0 opens the run; the others get its id and no active MLflow run (`ctx.main` is False),
    so whatever they would log must be guarded by `ctx.main`.
    """
    from grpo import distributed, faults
    from stages import attempts

    tracking.check_tracking(recipe.tracking)
    key = stage_key(name, cfg, inputs, recipe)
    workdir = Path(recipe.output_dir) / name / key[:16]
    workdir.mkdir(parents=True, exist_ok=True)
    faults.set_stage(name)
    if not distributed.is_main():
        yield StageContext(name, recipe, distributed.broadcast(None), key, workdir, inputs, progress, main=False)
        return
    params = flatten(cfg, f"{name}.") | {"seed": str(recipe.seed), "prompt.template": recipe.prompt.template}
    params |= {f"input.{k}": v for k, v in inputs.items()}
    tags = {KEY_TAG: key} | {f"r1.input.{k}": v for k, v in inputs.items()}
    with attempts.work_lock(workdir, name), \
            tracking.stage_run(recipe.tracking, name, params, recipe.name, parent_run_id, extra_tags=tags) as run:
        log.info("stage %s: MLflow run %s, work dir %s", name, run.info.run_id, workdir)
        attempts.begin(run.info.experiment_id, KEY_TAG, key, run.info.run_id)  # after a crash: takes over its steps
        distributed.broadcast(run.info.run_id)
        yield StageContext(name, recipe, run.info.run_id, key, workdir, inputs, progress)
        attempts.finish(run.info.run_id)


def record_outputs(recipe: Recipe, outputs: dict[str, str]) -> None:
    """Tag the stage's run with what it returned, so a later pipeline run with the same stage key can reuse it."""
    import mlflow

    tracking.setup(recipe.tracking)
    mlflow.MlflowClient().set_tag(outputs["run_id"], OUTPUTS_TAG, json.dumps(outputs))


def finished_run_with_key(recipe: Recipe, key: str):
    """A FINISHED run of this experiment whose stage key is `key` and whose outputs were recorded, or None."""
    return next((r for r in finished_runs(recipe, KEY_TAG, key) if OUTPUTS_TAG in r.data.tags), None)


def finish_with_model(ctx: StageContext, model, tokenizer, evaluate_it: bool = True,
                      extra_outputs: dict[str, str] | None = None, save=None) -> dict[str, str]:
    """Save the model into the work dir, log it as the run's `model/` artifact, evaluate it on held-out prompts.

    save: a callable(dir) that writes the model (e.g. a trainer's, which gathers ZeRO-3 shards; every rank calls it);
    default save_pretrained of `model` and `tokenizer`. On several ranks the others return after the save: rank 0
    alone logs, registers and evaluates (a ZeRO-3 model, whose weights are sharded, through its saved copy).
    """
    import mlflow

    out = ctx.workdir / "model"
    outputs = {"run_id": ctx.run_id, "model": f"runs:/{ctx.run_id}/model", **(extra_outputs or {})}
    if save is not None:
        save(out)
    elif ctx.main:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if not ctx.main:
        return outputs
    mlflow.log_artifacts(str(out), artifact_path="model")
    register_model(ctx)
    if evaluate_it:
        log_evaluation(ctx, _whole_model(model, out), tokenizer)
    return outputs


def _whole_model(model, saved: Path):
    """`model`, or when its weights are ZeRO-3 shards (a forward would need every rank) its saved copy, reloaded."""
    param = next(model.parameters(), None)
    if param is None or not hasattr(param, "ds_id"):
        return model
    from stages.models import load_model

    return load_model(saved, str(param.device))


MODEL_ALIAS = "current"


def registered_model_name(recipe: Recipe, stage: str) -> str:
    return f"r1-{recipe.name}-{stage}"


def register_model(ctx: StageContext) -> str:
    """Register the run's `model/` as a new version of `r1-<recipe>-<stage>` and point the alias `current` at it, so
    users and reruns can say `models:/r1-tiny-r1_zero@current`. Returns the version's URI."""
    import mlflow

    client = mlflow.MlflowClient()
    name = registered_model_name(ctx.recipe, ctx.name)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"{ctx.name} models of recipe {ctx.recipe.name}")
    source = client.get_run(ctx.run_id).info.artifact_uri + "/model"
    version = client.create_model_version(name, source=source, run_id=ctx.run_id, tags={KEY_TAG: ctx.key})
    client.set_registered_model_alias(name, MODEL_ALIAS, version.version)
    uri = f"models:/{name}/{version.version}"
    client.set_tag(ctx.run_id, "r1.registered_model", uri)
    return uri


def log_evaluation(ctx: StageContext, model, tokenizer, prefix: str = "eval/", table: str = "samples.json"):
    import mlflow

    from stages.base_model import heldout_problems
    from stages.evaluate import evaluate

    r = ctx.recipe
    res = evaluate(model, tokenizer, heldout_problems(r), r.eval, r.prompt.template, r.prompt.target_language,
                   progress=ctx.progress)
    mlflow.log_metrics(res.metrics(prefix))
    if table:
        mlflow.log_table({k: [s[k] for s in res.samples] for k in res.samples[0]}, table)
    log.info("stage %s evaluation: %s", ctx.name, {k: round(v, 3) for k, v in res.metrics(prefix).items()})
    return res


def run_metrics(run_id: str) -> dict[str, float]:
    import mlflow

    return dict(mlflow.get_run(run_id).data.metrics)
