"""The recipe's own problems on either side of the held-out split (stages.core.data.split_of): the evaluation problems
every stage is scored on, and the noisy pretraining texts of the tiny base model, drawn from the train side only; and
the prompts a model is sampled on outside training, built the way GRPO builds its own."""

from __future__ import annotations

import random

from stages.core.configs import DataSource
from stages.core.data import load_problems, prompt_rows, render_chat
from stages.core.recipe import BaseModelConfig, PromptConfig, Recipe
from stages.core.tasks import Problem, TraceNoise, noisy_trace


def problems_for(cfg: BaseModelConfig, split: str, n: int, seed: int) -> list[Problem]:
    """n problems of the recipe's task family from one split (the other split's questions are never returned)."""
    return load_problems(DataSource(task=cfg.task, max_digits=cfg.max_digits), split, n, seed)


def heldout_problems(recipe: Recipe, n: int | None = None) -> list[Problem]:
    """The evaluation split: problems whose questions no stage ever trains on."""
    return problems_for(recipe.base_model, "eval", n or recipe.eval.num_prompts, recipe.eval.seed)


def problem_prompts(problems: list[Problem], prompt: PromptConfig, tokenizer) -> list[str]:
    """The prompt texts of `problems` exactly as GRPO trains on them (stages.core.grpo_runner: prompt_rows, then
    render_chat): the template, or with style chat the system turn and the model's chat template."""
    return [row["prompt"] for row in render_chat(prompt_rows(problems, prompt), tokenizer)]


def pretraining_texts(recipe: Recipe) -> list[tuple[str, str]]:
    """(prompt, noisy completion) pairs for pretraining, from the train split only."""
    cfg = recipe.base_model
    rng = random.Random(recipe.seed)
    noise = TraceNoise(**cfg.noise.model_dump())
    probs = problems_for(cfg, "train", cfg.train_problems, recipe.seed)
    return [(recipe.prompt.template.format(question=p.question), " " + noisy_trace(p, rng, noise)) for p in probs]
