"""What every stage does around its own work: open its MLflow run, keep a work directory, and finish by saving,
evaluating and logging its model.

The work directory is keyed by the stage key (stages.core.lineage), not by run id: a rerun of the same stage on the
same inputs finds the checkpoints or shards a killed run left, and resumes from them.

mlflow is imported inside functions: the stage modules import this one, and `r1 validate` must start fast.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from grpo import distributed, faults
from stages.core import attempts, console, tracking
from stages.core.benchmarks import benchmark_file, evaluate_benchmark, load_benchmark
from stages.core.distributed import deepspeed_config
from stages.core.evaluate import evaluate
from stages.core.heldout import heldout_problems
from stages.core.lineage import EVAL_KEY_TAG, KEY_TAG, StageInputError, eval_key, register_model, stage_key
from stages.core.models import load_model, load_tokenizer, pick_device, resolve_model_uri
from stages.core.recipe import Recipe, flatten

log = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseModel)


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
        return attempts.stage_logger(self.run_id)

    def seeded(self, cfg: C) -> C:
        """A trainer config (GRPO or SFT) whose seed is offset by the recipe's: `--set seed=N` reseeds every stage's
        sampling and data order, not only the problems and the base model (seed 0 keeps the stage's own seed)."""
        return cfg.model_copy(update={"seed": cfg.seed + self.recipe.seed})


@contextlib.contextmanager
def stage_context(recipe: Recipe, name: str, cfg: BaseModel, inputs: dict[str, str], parent_run_id: str | None,
                  progress: bool):
    """Open the stage's MLflow run (nested under the pipeline's) and its keyed work directory.

    On several ranks only rank 0 opens the run; the others get its id and no active MLflow run (`ctx.main` is False),
    so whatever they would log must be guarded by `ctx.main`.
    """
    tracking.check_tracking(recipe.tracking)
    key = stage_key(name, cfg, inputs, recipe)
    workdir = Path(recipe.output_dir) / name / key[:16]
    workdir.mkdir(parents=True, exist_ok=True)
    check_resumable(recipe, name, cfg, workdir)
    faults.set_stage(name)
    if not distributed.is_main():
        yield StageContext(name, recipe, distributed.broadcast(None), key, workdir, inputs, progress, main=False)
        return
    params = flatten(cfg, f"{name}.") | {"seed": str(recipe.seed), "prompt.template": recipe.prompt.template}
    params |= {f"input.{k}": v for k, v in inputs.items()}
    tags = {KEY_TAG: key, EVAL_KEY_TAG: eval_key(key, recipe)} | {f"r1.input.{k}": v for k, v in inputs.items()}
    with attempts.work_lock(workdir, name), \
            tracking.stage_run(recipe.tracking, name, params, recipe.name, parent_run_id, extra_tags=tags) as run, \
            attempts.killed_on_interrupt(run.info.run_id, f"stage {name}", workdir):
        console.stage_started(name, run.info.run_id, workdir)
        t0 = time.monotonic()
        attempts.begin(run.info.experiment_id, KEY_TAG, key, run.info.run_id)  # after a crash: takes over its steps
        distributed.broadcast(run.info.run_id)
        yield StageContext(name, recipe, run.info.run_id, key, workdir, inputs, progress)
        attempts.finish(run.info.run_id)
        finished_line(recipe, name, run.info, time.monotonic() - t0)


def check_resumable(recipe: Recipe, name: str, cfg: BaseModel, workdir: Path) -> None:
    """A training stage's checkpoint that this launch could not resume (another world size, and an engine or ZeRO
    stage that cannot reshard it) is refused here, before its MLflow run opens or any model loads."""
    train = getattr(cfg, "grpo", None) or getattr(cfg, "sft", None)
    if train is None or not (workdir / "checkpoints").is_dir():
        return
    from grpo.checkpoint import resume_problem  # lazy: imports torch

    # in-process (no process group) a stage trains with plain torch; deepspeed_config would say so a second time
    ds = deepspeed_config(recipe, getattr(cfg, "deepspeed_config", None)) if distributed.is_distributed() else None
    if problem := resume_problem(workdir / "checkpoints", ds, lora=train.lora.enabled):
        raise StageInputError(f"stage {name}: {problem}")


def finished_line(recipe: Recipe, name: str, info, seconds: float) -> None:
    """The stage's end line on the console: time, held-out evaluation, link to its MLflow run."""
    import mlflow

    metrics = mlflow.get_run(info.run_id).data.metrics
    console.stage_finished(name, seconds, metrics, console.run_url(console.ui_address(recipe.tracking),
                                                                   info.experiment_id, info.run_id))


def finish_with_model(ctx: StageContext, model, tokenizer, evaluate_it: bool = True,
                      extra_outputs: dict[str, str] | None = None, save=None) -> dict[str, str]:
    """Save the model into the work dir, log it as the run's `model/` artifact, evaluate it on held-out prompts.

    save: a callable(dir) that writes the model (e.g. a trainer's, which gathers ZeRO-3 shards; every rank calls it);
    default save_pretrained of `model` and `tokenizer`. On several ranks rank 0 alone logs and registers, then every
    rank generates its share of the evaluation (a ZeRO-3 model, whose weights are sharded, through its saved copy) and
    rank 0 logs the metrics.
    """
    import mlflow

    out = ctx.workdir / "model"
    outputs = {"run_id": ctx.run_id, "model": f"runs:/{ctx.run_id}/model", **(extra_outputs or {})}
    if save is not None:
        save(out)
    elif ctx.main:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if ctx.main:
        tracking.make_pyfunc(out, ctx.run_id)
        mlflow.log_artifacts(str(out), artifact_path="model")
        register_model(ctx.recipe, ctx.name, ctx.run_id, ctx.key)
    if evaluate_it:
        distributed.barrier()  # rank 0's saved copy is whole before the others read it
        log_evaluation(ctx, _whole_model(model, out), tokenizer)
    if ctx.main:
        tracking.log_curves(ctx.run_id)
    return outputs


def _whole_model(model, saved: Path):
    """`model`, or when its weights are ZeRO-3 shards (a forward would need every rank) its saved copy, reloaded."""
    param = next(model.parameters(), None)
    if param is None or not hasattr(param, "ds_id"):
        return model
    return load_model(saved, str(param.device))


def log_evaluation(ctx: StageContext, model, tokenizer, prefix: str = "eval/", table: str = "samples.json"):
    """Held-out evaluation and the recipe's benchmarks into the stage's run. Called on every rank of a launch (each
    generates its share); rank 0 logs and returns the held-out result, the others return None."""
    import mlflow

    r = ctx.recipe
    problems = heldout_problems(r)
    if ctx.main:
        tracking.log_dataset([{"question": p.question, "answer": p.answer} for p in problems], "heldout",
                             tracking.data_source_uri(r.base_model, "eval"), "evaluation")
    res = evaluate(model, tokenizer, problems, r.eval, r.prompt, progress=ctx.progress)
    if res is not None:
        mlflow.log_metrics(res.metrics(prefix))
        if table:
            mlflow.log_table({k: [s[k] for s in res.samples] for k in res.samples[0]}, table)
        log.debug("stage %s evaluation: %s", ctx.name, {k: round(v, 3) for k, v in res.metrics(prefix).items()})
    for bench in r.eval.benchmarks:  # bench/<name>/... (a distilled student's: bench/<student>/<name>/...)
        rows = load_benchmark(bench)
        if ctx.main:
            tracking.log_dataset([{"question": p.question, "answer": p.answer} for p in rows], f"bench-{bench.name}",
                                 f"path:{benchmark_file(bench.path)}", "evaluation")
        scores = evaluate_benchmark(model, tokenizer, rows, bench, r.eval, r.prompt, ctx.progress)
        if scores is not None:
            mlflow.log_metrics(scores.metrics("bench/" + prefix.removeprefix("eval/")))
    return res


def evaluate_finished(recipe: Recipe, name: str, outputs: dict[str, str], key: str, parent_run_id: str | None,
                      progress: bool = False) -> str:
    """The held-out evaluation of a finished stage's model under the recipe's (changed) eval settings, in its own run
    `<stage>-evaluation` nested under the pipeline's, tagged with the eval key; the stage's run is left as it was.
    Returns the new run's id."""
    import mlflow

    model_dir = resolve_model_uri(outputs["model"])
    model = load_model(model_dir, pick_device(recipe.device), recipe.base_model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, recipe.base_model.trust_remote_code)
    tags = {tracking.STAGE_TAG: tracking.EVALUATION, tracking.RECIPE_TAG: recipe.name, tracking.EVALUATES_TAG: name,
            "r1.evaluated_run": outputs["run_id"], EVAL_KEY_TAG: eval_key(key, recipe), "r1.input.model": outputs["model"]}
    if parent_run_id:
        tags[tracking.PIPELINE_TAG] = parent_run_id
    with mlflow.start_run(experiment_id=tracking.setup(recipe.tracking), run_name=f"{name}-{tracking.EVALUATION}",
                          parent_run_id=parent_run_id, nested=parent_run_id is not None, tags=tags) as run:
        tracking.log_params(flatten(recipe.eval, "eval.") | {"model": outputs["model"]})
        ctx = StageContext(name, recipe, run.info.run_id, key, model_dir, {"model": outputs["model"]}, progress)
        log_evaluation(ctx, model, tokenizer)
    return run.info.run_id
