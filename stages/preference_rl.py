"""Preference RL: all-scenario RL from the general-SFT model (R1 §2.3.4).

One GRPO run over a mix of prompts: reasoning prompts scored by rule rewards (accuracy, format, language consistency)
and general prompts scored by reward models (helpfulness on the final answer, harmlessness on the whole response).
Each row carries its `kind`; every reward is routed to its kind and gives 0.0 on the other, so a prompt's group is
scored by one family of rewards only and GRPO's per-group statistics stay per prompt.

A reward model not given in the config is trained here (Bradley-Terry on synthetic pairs of the `general` family) and
logged as `reward_models/<name>/`, with its held-out pairwise accuracy. Each reward model is trained and scored on the
same view of a completion (its mode, recorded in its folder): the pairs are whole completions written as the policy
writes them, and the model reads them through its view in training, evaluation and RL alike.

torch, transformers and mlflow are imported inside functions: the registry imports every stage, and `r1 validate`
must start fast.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from rewards.reward_model import RewardModelScorer, pairwise_accuracy, recorded_mode, train_bradley_terry
from stages.core.configs import PreferenceRLConfig
from stages.core.context import stage_context
from stages.core.data import load_problems, prompt_rows
from stages.core.grpo_runner import reward_functions, train_grpo
from stages.core.lineage import resolve_input, use_tracking_for
from stages.core.models import (
    ModelInputError,
    check_model_dir,
    load_model,
    load_model_and_tokenizer,
    pick_device,
    resolve_model_uri,
)
from stages.core.recipe import Recipe
from stages.core.tasks import bad_reply

log = logging.getLogger(__name__)

STAGE = "preference_rl"
UPSTREAM = {"model": ("general_sft", "model")}
REASONING, GENERAL = "reasoning", "general"
# reward model -> (what it reads of a completion, how a rejected reply is made)
REWARD_MODELS = {"helpfulness": ("answer", False), "harmlessness": ("full", True)}


# ---- prompts and reward routing

def routed(fn: Callable, kind: str) -> Callable:
    """`fn` scored only on rows of `kind` (the rest get 0.0): one call on the matching sub-batch."""

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        kinds = columns.get("kind")
        if kinds is None:
            raise ValueError("routed rewards need a 'kind' column on every row ('reasoning' or 'general')")
        idx = [i for i, k in enumerate(kinds) if k == kind]
        out = [0.0] * len(completions)
        if idx:
            sub = {k: [v[i] for i in idx] for k, v in columns.items()}
            scores = fn([prompts[i] for i in idx], [completions[i] for i in idx], **sub)
            for i, s in zip(idx, scores, strict=True):
                out[i] = float(s)
        return out

    reward.process = False
    reward.__name__ = f"{getattr(fn, '__name__', type(fn).__name__)}@{kind}"
    return reward


def mix_counts(n_reasoning: int, n_general: int, share: float) -> tuple[int, int]:
    """How many of each kind to keep so that general prompts make `share` of the mix, using as many as possible."""
    if share <= 0 or n_general == 0:
        return n_reasoning, 0
    if share >= 1 or n_reasoning == 0:
        return 0, n_general
    want_general = round(n_reasoning * share / (1 - share))
    if want_general <= n_general:
        return n_reasoning, max(1, want_general)
    return max(1, round(n_general * (1 - share) / share)), n_general


def mixed_rows(recipe: Recipe, cfg: PreferenceRLConfig) -> list[dict]:
    """Reasoning and general prompt rows (tagged `kind`), in the configured proportion, shuffled."""

    reasoning = general = []
    if cfg.general_share < 1:
        reasoning = [r | {"kind": REASONING}
                     for r in prompt_rows(load_problems(cfg.data, "train", seed=recipe.seed), recipe.prompt, "r")]
    if cfg.general_share > 0:
        general = [r | {"kind": GENERAL}
                   for r in prompt_rows(load_problems(cfg.general_data, "train", seed=recipe.seed), recipe.prompt,
                                         "g")]
    n_r, n_g = mix_counts(len(reasoning), len(general), cfg.general_share)
    rows = reasoning[:n_r] + general[:n_g]
    random.Random(recipe.seed).shuffle(rows)
    log.info("preference_rl: %d reasoning + %d general prompts", n_r, n_g)
    return rows


def reward_model_rewards(scorers: dict[str, Callable], weight: float) -> list[tuple[str, Callable, float]]:
    return [(name, routed(scorer, GENERAL), weight) for name, scorer in scorers.items()]


def all_rewards(rule_rewards: list[tuple[str, Callable, float]], scorers: dict[str, Callable],
                weight: float) -> list[tuple[str, Callable, float]]:
    """Rule rewards on reasoning rows, reward models on general rows."""
    return [(n, routed(f, REASONING), w) for n, f, w in rule_rewards] + reward_model_rewards(scorers, weight)


# ---- reward models

def general_completion(thought: str, reply: str, tagged: bool) -> str:
    """A reply to a general prompt as the policy writes it: plain (as general SFT teaches it) or in the R1 template."""
    return f"<think>{thought}</think><answer>{reply}</answer>" if tagged else " " + reply


def preference_pairs(recipe: Recipe, cfg: PreferenceRLConfig, which: str, split: str, n: int):
    """(prompt, chosen, rejected) whole completions from the `general` family, half of them plain and half a thought
    then the answer; the reward model reads them through its view. Harmlessness reads the whole response, so a rude
    thought before a good answer is a rejected reply too."""

    _, harmful = REWARD_MODELS[which]
    seed = recipe.seed + (1 if split == "train" else 2) * 1009 + (7 if harmful else 0)
    rng, form = random.Random(seed), random.Random(f"{seed}-form")
    out = []
    for p in load_problems(cfg.general_data, split, n=n, seed=seed):
        prompt = recipe.prompt.template.format(question=p.question)
        bad, tagged, thought = bad_reply(p, rng, harmful=harmful), form.random() < 0.5, f"the user asks: {p.question}"
        chosen = general_completion(thought, p.answer, tagged)
        if harmful and tagged and form.random() < 0.5:
            rejected = general_completion(bad, p.answer, tagged)
        else:
            rejected = general_completion(thought, bad, tagged)
        out.append((prompt, chosen, rejected))
    return out


def train_reward_model(recipe: Recipe, cfg: PreferenceRLConfig, tokenizer, which: str, out_dir: Path) -> Path:
    """A small Qwen2 sequence classifier on the policy's tokenizer, fitted with Bradley-Terry; reused if the work dir
    already holds a finished one."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    if (out_dir / "done.json").exists():
        log.info("reward model %s: reusing %s", which, out_dir)
        return out_dir
    t = cfg.reward_model_training
    arch = t.model
    torch.manual_seed(recipe.seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=arch.hidden_size,
                         num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_key_value_heads, intermediate_size=arch.intermediate_size,
                         max_position_embeddings=arch.max_position_embeddings, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Qwen2ForSequenceClassification(config)
    pairs = preference_pairs(recipe, cfg, which, "train", t.pairs)
    train_bradley_terry(model, tokenizer, pairs, REWARD_MODELS[which][0], epochs=t.epochs, lr=t.learning_rate, batch_size=t.batch_size,
                        out_dir=out_dir, max_length=t.max_length, seed=recipe.seed)
    (out_dir / "done.json").write_text(json.dumps({"pairs": len(pairs)}))
    return out_dir


def check_reward_model_inputs(cfg: PreferenceRLConfig) -> dict[str, str]:
    """Given reward models, checked before any model loads (a bad path fails naming the field)."""

    given = {}
    for which, (mode, _) in REWARD_MODELS.items():
        uri = getattr(cfg, f"{which}_model")
        if uri is None or cfg.general_share == 0:
            continue
        try:
            path = resolve_model_uri(uri)
            check_model_dir(path, causal_lm=False)  # a sequence classifier
            trained_on = recorded_mode(path)
        except ValueError as e:  # ModelInputError too
            raise ModelInputError(f"preference_rl.{which}_model: {e}") from None
        if trained_on not in (None, mode):
            raise ModelInputError(f"preference_rl.{which}_model: {uri} was trained on the {trained_on!r} view of a "
                                  f"completion; {which} scores the {mode!r} view")
        given[which] = uri
    return given


# ---- general prompts before / after RL

def general_scores(model, tokenizer, prompts: list[str], scorers: dict[str, Callable], recipe: Recipe,
                   max_new_tokens: int) -> tuple[dict[str, float], list[str]]:
    """Mean score of each reward model on sampled replies to held-out general prompts."""
    import torch

    from grpo.rollout import HFGenerateBackend, SamplingParams  # lazy: imports torch

    model.eval()
    torch.manual_seed(recipe.eval.seed)
    with torch.no_grad():
        rollout = HFGenerateBackend(model, tokenizer).generate(
            prompts, 1, SamplingParams(temperature=recipe.eval.temperature, max_new_tokens=max_new_tokens))
    means = {}
    for name, scorer in scorers.items():
        scores = scorer(prompts, rollout.completions)
        means[name] = sum(scores) / len(scores)
    return means, rollout.completions


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    import mlflow

    cfg = recipe.preference_rl
    model_uri = resolve_input(recipe, inputs, "model", *UPSTREAM["model"])
    rule_rewards = reward_functions(recipe, cfg)  # a bad reward spec fails before any model loads
    use_tracking_for(recipe, cfg.helpfulness_model, cfg.harmlessness_model)
    given = check_reward_model_inputs(cfg)
    rows = mixed_rows(recipe, cfg)
    use_general = any(r["kind"] == GENERAL for r in rows)
    heldout_general = (load_problems(cfg.general_data, "eval", n=cfg.general_eval_prompts, seed=recipe.eval.seed)
                       if use_general else [])
    resolved = {"model": model_uri} | {f"{k}_model": v for k, v in given.items()}
    with stage_context(recipe, STAGE, cfg, resolved, parent_run_id, progress) as ctx:
        device = pick_device(recipe.device)
        model, tok = load_model_and_tokenizer(model_uri, device, recipe.base_model.trust_remote_code)
        scorers: dict[str, RewardModelScorer] = {}
        if use_general:
            for which, (mode, _) in REWARD_MODELS.items():
                if which in given:
                    path = resolve_model_uri(given[which])
                else:
                    path = train_reward_model(recipe, cfg, tok, which, ctx.workdir / "reward_models" / which)
                    mlflow.log_artifacts(str(path), artifact_path=f"reward_models/{which}")
                scorer = RewardModelScorer(path, mode=mode, batch_size=64,
                                           max_length=cfg.reward_model_training.max_length, device=device)
                held_out = preference_pairs(recipe, cfg, which, "eval", cfg.reward_model_training.eval_pairs)
                mlflow.log_metric(f"reward_model/{which}/pairwise_accuracy", pairwise_accuracy(scorer, held_out))
                scorers[which] = scorer
        prompts = [recipe.prompt.template.format(question=p.question) for p in heldout_general]
        max_new = cfg.grpo.max_completion_length
        if scorers:
            before, _ = general_scores(model, tok, prompts, scorers, recipe, max_new)
            mlflow.log_metrics({f"general/{k}_before": v for k, v in before.items()})
        rewards = all_rewards(rule_rewards, scorers, cfg.general_reward_weight)
        out = train_grpo(ctx, cfg, model, tok, rows, rewards)
        if scorers:
            trained = load_model(ctx.workdir / "model", device, recipe.base_model.trust_remote_code)
            after, replies = general_scores(trained, tok, prompts, scorers, recipe, max_new)
            mlflow.log_metrics({f"general/{k}_after": v for k, v in after.items()})
            mlflow.log_table({"prompt": prompts, "completion": replies}, "general_samples.json")
            log.info("preference_rl general scores before %s after %s", before, after)
        return out
