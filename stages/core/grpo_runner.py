"""The one runner behind every GRPO stage (r1_zero, reasoning_rl, preference_rl): load the input model, build the
prompts and rewards from the recipe, train with grpo.GRPOTrainer, resume from the work dir's checkpoints, finish.

mlflow is imported inside functions: the stage modules import this one, and `r1 validate` must start fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rewards import build_rewards
from stages.core.configs import GRPOStageConfig
from stages.core.context import StageContext, finish_with_model, stage_context
from stages.core.data import load_problems, prompt_rows
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
    grpo_cfg = cfg.grpo
    if grpo_cfg.checkpoint_every is None:
        grpo_cfg = grpo_cfg.model_copy(update={"checkpoint_every": max(1, grpo_cfg.total_steps // 4)})
    trainer = GRPOTrainer(model, tokenizer, grpo_cfg, rows, rewards, logger=ctx.logger, output_dir=ckpt_dir,
                          deepspeed_config=ds_config, progress=ctx.progress)
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        log.info("stage %s: resuming from %s", ctx.name, resume)
    history = trainer.train(resume_from=resume)
    if history and ctx.main:
        last = history[-min(len(history), 10):]
        mlflow.log_metrics({f"train_final/{k}": sum(h[k] for h in last) / len(last) for k in last[0]})
    with trainer.training.autocast():  # the evaluation runs in the stage's precision (bf16: the weights already are)
        return finish_with_model(ctx, trainer.engine.module, tokenizer, save=trainer.save_model)


def train_rows(recipe: Recipe, cfg: GRPOStageConfig) -> list[dict]:
    return prompt_rows(load_problems(cfg.data, "train", seed=recipe.seed), recipe.prompt.template)


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
