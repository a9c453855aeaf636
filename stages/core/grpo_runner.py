"""The one runner behind every GRPO stage (r1_zero, reasoning_rl, preference_rl): load the input model, build the
prompts and rewards from the recipe, train with grpo.GRPOTrainer, resume from the work dir's checkpoints, finish.

mlflow is imported inside functions: the stage modules import this one, and `r1 validate` must start fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rewards import build_rewards
from stages.core import console, tracking
from stages.core.configs import GRPOStageConfig
from stages.core.context import StageContext, finish_with_model, stage_context
from stages.core.data import load_problems, prompt_rows, render_chat
from stages.core.distributed import deepspeed_config
from stages.core.lineage import resolve_input
from stages.core.models import load_model_and_tokenizer, pick_device
from stages.core.recipe import Recipe

log = logging.getLogger(__name__)


def reward_functions(recipe: Recipe, cfg: GRPOStageConfig) -> list[tuple[str, Callable, float]]:
    """(name, callable, weight) from the recipe's reward specs; the language reward targets the recipe's language."""
    specs = []
    for spec in cfg.rewards:
        if spec.name == "language_consistency" and "target_language" not in spec.params:
            spec = spec.model_copy(update={"params": {**spec.params,
                                                      "target_language": recipe.prompt.target_language}})
        specs.append(spec)
    return build_rewards(specs)


def train_grpo(ctx: StageContext, cfg: GRPOStageConfig, model, tokenizer, rows: list[dict],
               rewards: list[tuple[str, Callable, float]]) -> dict[str, str]:
    """Train `model` on `rows` with GRPO inside an open stage context; resumes from the newest checkpoint."""
    import mlflow

    # lazy: the trainer and checkpoints import torch
    from grpo import GRPOTrainer
    from grpo.checkpoint import latest_checkpoint

    ds_config = deepspeed_config(ctx.recipe, cfg.deepspeed_config)  # the stage's own, else the cluster's
    ckpt_dir = ctx.workdir / "checkpoints"
    grpo_cfg = ctx.seeded(cfg.grpo)
    if grpo_cfg.checkpoint_every is None:
        grpo_cfg = grpo_cfg.model_copy(update={"checkpoint_every": max(1, grpo_cfg.total_steps // 4)})
    rows = render_chat(rows, tokenizer)  # style chat: the model's chat template, now that its tokenizer is loaded
    callbacks = []
    if ctx.main:
        tracking.log_dataset(rows, f"{ctx.name}-prompts", prompt_sources(cfg), "training")
        every = cfg.log_completions_every or max(1, grpo_cfg.total_steps // 4)
        weights = {name: weight for name, _, weight in rewards}
        callbacks += [CompletionsTable(ctx.run_id, every, grpo_cfg.total_steps, cfg.samples_to_log, weights),
                      sample_printer(ctx, cfg, weights)]
    logger = ctx.logger
    if ctx.progress and not console.interactive():  # no terminal for the trainer's bar: step lines instead
        logger = console.StepLogger(logger, console.StepLines(grpo_cfg.total_steps, ctx.name))
    trainer = GRPOTrainer(model, tokenizer, grpo_cfg, rows, rewards, logger=logger, output_dir=ckpt_dir,
                          deepspeed_config=ds_config, progress=ctx.progress and console.interactive(),
                          callbacks=callbacks)
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        log.info("stage %s: resuming from %s", ctx.name, resume)
    history = trainer.train(resume_from=resume)
    if history and ctx.main:
        last = history[-min(len(history), 10):]
        mlflow.log_metrics({f"train_final/{k}": sum(h[k] for h in last) / len(last) for k in last[0]})
    with trainer.training.autocast():  # the evaluation runs in the stage's precision (bf16: the weights already are)
        return finish_with_model(ctx, trainer.engine.module, tokenizer, save=trainer.save_model)


class CompletionsTable:
    """A trainer callback: every `every` steps and at the last, the first `n` completions of the step (whole groups
    first: a prompt's G completions are consecutive) with each reward, the weighted total and the advantage, as the
    MLflow table `completions/step_XXXX.json` of the stage's run."""

    def __init__(self, run_id: str, every: int, last: int, n: int, weights: dict[str, float]):
        self.run_id, self.every, self.last, self.n, self.weights = run_id, every, last, n, weights

    def __call__(self, step: int, rollout, rewards: dict[str, list[float]], advantages) -> None:
        if not self.n or (step % self.every and step != self.last):
            return
        import mlflow

        n = min(self.n, len(rollout.completions))
        per_completion = advantages if advantages.dim() == 1 else advantages[:, 0]  # process mode: the return at t=0
        table = {"step": [step] * n, "prompt": rollout.prompts[:n], "completion": rollout.completions[:n]}
        table |= {f"reward/{name}": values[:n] for name, values in rewards.items()}
        table["reward"] = [sum(self.weights[k] * v[i] for k, v in rewards.items()) for i in range(n)]
        table["advantage"] = per_completion[:n].tolist()
        mlflow.MlflowClient().log_table(self.run_id, table, f"completions/step_{step:04d}.json")


def prompt_sources(cfg: GRPOStageConfig) -> str:
    """The dataset source of a stage's prompts (preference RL mixes two)."""
    sources = [cfg.data] + ([cfg.general_data] if getattr(cfg, "general_share", 0) > 0 else [])
    return " + ".join(tracking.data_source_uri(s, "train") for s in sources)


def sample_printer(ctx: StageContext, cfg: GRPOStageConfig, weights: dict[str, float], lines: int = 2,
                   width: int = 160):
    """A trainer callback: every ~fifth of the run, the step's first completion and its best one (when they differ),
    each on one line truncated to `width`, at INFO. Off when `samples_to_log` is 0."""
    every = max(1, cfg.grpo.total_steps // 5)
    shown = min(lines, cfg.samples_to_log)

    def show(step: int, rollout, rewards: dict[str, list[float]], advantages) -> None:
        if not shown or step % every:
            return
        totals = [sum(weights[k] * v[i] for k, v in rewards.items()) for i in range(len(rollout.completions))]
        picks = list(dict.fromkeys([0, max(range(len(totals)), key=totals.__getitem__)]))[:shown]
        for i in picks:
            text = " ".join(rollout.completions[i].split())  # one line
            text = text if len(text) <= width else text[: width - 1] + "…"
            log.info("%s step %d sample (reward %.2f): %s", ctx.name, step, totals[i], text)

    return show


def train_rows(recipe: Recipe, cfg: GRPOStageConfig) -> list[dict]:
    return prompt_rows(load_problems(cfg.data, "train", seed=recipe.seed), recipe.prompt)


def run_stage(stage: str, cfg: GRPOStageConfig, upstream: str, recipe: Recipe, inputs: dict | None,
              parent_run_id: str | None, progress: bool) -> dict[str, str]:
    """A reasoning GRPO stage from end to end: resolve the input model, build rewards and prompts (cheap checks
    first), then load and train inside the stage's MLflow run."""
    model_uri = resolve_input(recipe, inputs, "model", upstream, "model")
    if cfg.grpo.rollout_backend == "vllm":
        from grpo.rollout_vllm import check_vllm_installed  # lazy: imports torch

        check_vllm_installed()  # a missing vLLM fails before any model loads
    rewards = reward_functions(recipe, cfg)  # a bad reward spec fails before any model loads
    rows = train_rows(recipe, cfg)
    with stage_context(recipe, stage, cfg, {"model": model_uri}, parent_run_id, progress) as ctx:
        model, tok = load_model_and_tokenizer(model_uri, pick_device(recipe.device),
                                              recipe.base_model.trust_remote_code)
        return train_grpo(ctx, cfg, model, tok, rows, rewards)
