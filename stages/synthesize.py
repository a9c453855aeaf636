"""Synthesize: the SFT set of R1 §2.3.3 — reasoning samples rejection-sampled from the reasoning-RL model, plus general
(non-reasoning) samples. The paper keeps ~600k reasoning samples (correct, one language, clean format, not too long, no
duplicates) and adds ~200k general ones; here both counts are `reasoning_target` and `general_target`.

Data parallel and resumable (stages.core.sharding): on N ranks each generates its share of the generation batches into
its own shards of `shard_size` rows under `<workdir>/shards/rank-<r>/` (whole or absent: written, then renamed); rank 0
merges them in batch order, so the rows equal a 1-rank run's, and alone writes the outputs and talks to MLflow. A rerun
(same config and input, hence the same work dir) resumes every rank from its own last shard; since each generation
batch is seeded by its index, the final rows equal an uninterrupted run's.

mlflow is imported inside functions: the registry imports every stage, and `r1 validate` must start fast.
"""

from __future__ import annotations

import logging
import warnings

from stages.core import tracking
from stages.core.context import stage_context
from stages.core.data import load_problems, save_rows
from stages.core.lineage import resolve_input
from stages.core.recipe import Recipe
from stages.core.rejection import Counts, Filters, RejectionSampler, load_backend
from stages.core.sharding import generation_rank, sample_sharded

log = logging.getLogger(__name__)

STAGE = "synthesize"
UPSTREAM = {"model": ("reasoning_rl", "model")}
TARGET_TAG = "r1.synthesize.target_not_reached"


class TargetNotReachedWarning(UserWarning):
    """Fewer rows survived the filters than the target asked for."""


class SynthesisError(RuntimeError):
    """No reasoning sample survived the filters."""


def filters_of(cfg) -> Filters:
    return Filters(require_correct=cfg.require_correct, require_language=cfg.require_language,
                   require_format=cfg.require_format, max_completion_tokens=cfg.max_completion_tokens,
                   dedupe=cfg.dedupe)


def reasoning_problems(recipe: Recipe):
    cfg = recipe.synthesize
    if cfg.reasoning_target == 0:
        return []
    return load_problems(cfg.data, "train", n=min(cfg.max_prompts, cfg.data.num_prompts), seed=recipe.seed)


def general_rows(recipe: Recipe) -> list[dict]:
    """General (non-reasoning) samples: the recipe's prompt around the question, the task's reference reply as the
    completion (plain text, no CoT).

    These stand in for the general data of the paper, which DeepSeek-V3 wrote (writing, factual QA, self-cognition,
    translation; a CoT only for the harder ones). Here the `general` task family (or a given dataset's answer column)
    supplies one good reply per request, taken as correct (reward 1).
    """
    cfg = recipe.synthesize
    if cfg.general_target == 0:
        return []
    src = cfg.general_data
    origin = f"generated:{src.task}" if src.source == "generated" else f"{src.source}:{src.path}"
    probs = load_problems(src, "train", n=cfg.general_target, seed=recipe.seed)
    return [{"prompt": recipe.prompt.template.format(question=p.question), "completion": " " + p.answer.strip(),
             "question": p.question, "answer": p.answer, "task": p.task, "metadata": p.metadata, "kind": "general",
             "source_run": origin, "prompt_id": f"g{i}", "sample_index": 0, "reward": 1.0}
            for i, p in enumerate(probs)]


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    import mlflow

    cfg = recipe.synthesize
    if cfg.reasoning_target + cfg.general_target == 0:
        raise ValueError("synthesize: reasoning_target and general_target are both 0; nothing to make")
    model_uri = resolve_input(recipe, inputs, "model", *UPSTREAM["model"])
    problems = reasoning_problems(recipe)  # a bad data source fails here, before any model loads
    general = general_rows(recipe)
    if cfg.rollout_backend == "vllm":
        from grpo.rollout_vllm import check_vllm_installed  # lazy: imports torch

        check_vllm_installed()  # a missing vLLM fails before any model loads
    with stage_context(recipe, STAGE, cfg, {"model": model_uri}, parent_run_id, progress) as ctx:
        sampled = sample_reasoning(ctx, model_uri, problems)
        if not ctx.main:  # rank 0 merged the shards and writes the outputs
            return {"run_id": ctx.run_id, "data": f"runs:/{ctx.run_id}/data"}
        reasoning, counts = sampled
        rows = reasoning + general
        metrics = counts.metrics("synth/") | {
            "synth/reasoning_rows": len(reasoning), "synth/general_rows": len(general), "synth/rows": len(rows),
            "synth/reasoning_target_reached": float(len(reasoning) >= cfg.reasoning_target),
            "synth/general_target_reached": float(len(general) >= cfg.general_target)}
        mlflow.log_metrics(metrics)
        _check_targets(cfg, reasoning, general, counts, len(problems))

        folder = save_rows(rows, ctx.workdir / "data")
        mlflow.log_artifacts(str(folder), artifact_path="data")
        tracking.log_dataset(rows, "synthesized", f"runs:/{ctx.run_id}/data", "synthesized")
        shown = reasoning[: cfg.samples_to_log // 2]
        shown += general[: cfg.samples_to_log - len(shown)]
        if shown:
            cols = ("kind", "prompt", "completion", "answer", "reward", "source_run", "prompt_id", "sample_index")
            mlflow.log_table({c: [r[c] for r in shown] for c in cols}, "samples.json")
        log.info("synthesize: %d reasoning + %d general rows; %s", len(reasoning), len(general), counts.why())
        return {"run_id": ctx.run_id, "data": f"runs:/{ctx.run_id}/data"}


def _check_targets(cfg, reasoning: list[dict], general: list[dict], counts: Counts, num_prompts: int) -> None:
    import mlflow

    problems = []
    if len(reasoning) < cfg.reasoning_target:
        problems.append(f"kept {len(reasoning)} of reasoning_target={cfg.reasoning_target} reasoning samples after "
                        f"all {num_prompts} prompts (max_prompts={cfg.max_prompts}, k={cfg.samples_per_prompt}): "
                        f"{counts.why()}")
    if len(general) < cfg.general_target:
        problems.append(f"general_data has {len(general)} train rows, general_target={cfg.general_target}")
    if not problems:
        return
    msg = "synthesize: target not reached: " + "; ".join(problems)
    mlflow.set_tag(TARGET_TAG, msg[:5000])
    if cfg.reasoning_target and not reasoning:
        raise SynthesisError(msg + ". No reasoning sample survived: loosen the filters (require_correct, "
                             "require_format, require_language, max_completion_tokens) or sample from a better model")
    log.warning(msg)
    warnings.warn(msg, TargetNotReachedWarning, stacklevel=3)


def sample_reasoning(ctx, model_uri: str, problems) -> tuple[list[dict], Counts] | None:
    """Rejection-sample up to reasoning_target rows on every rank of the launch, each rank resuming from its own shards
    in the work dir; rank 0 gets the merged rows (a 1-rank run's), the others None."""
    cfg, recipe = ctx.recipe.synthesize, ctx.recipe
    sampler = RejectionSampler(None, problems, source_run=model_uri, prompt=recipe.prompt,
                               samples_per_prompt=cfg.samples_per_prompt,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, filters=filters_of(cfg),
                               batch_prompts=cfg.batch_prompts, seed=recipe.seed,
                               seeded_completions=cfg.rollout_backend == "vllm")
    gen = generation_rank(cfg.vllm_tensor_parallel_size)

    def log_shard(shard: int, kept: int, counts: Counts) -> None:
        # step = shards written (from 1: the end-of-stage summary is logged at step 0)
        ctx.logger.log_metrics(counts.metrics("synth/") | {"synth/kept": kept}, step=shard + 1)

    def log_sync(batches: int, kept: int, counts: Counts) -> None:
        # several ranks: step = generation batches done, at each all-reduce of the counts. `sampled` counts the batches
        # past the target too (the merge drops them): the counts of the rows kept are logged once, at the end
        ctx.logger.log_metrics({"synth/kept": min(kept, cfg.reasoning_target), "synth/sampled": counts.generated},
                               step=batches)

    return sample_sharded(sampler, lambda: load_backend(model_uri, cfg, recipe), cfg.reasoning_target,
                          ctx.workdir / "shards", cfg.shard_size, gen=gen, label=STAGE, progress=ctx.progress,
                          fault_kind=STAGE, on_shard=log_shard if ctx.main and gen.world == 1 else None,
                          on_sync=log_sync if ctx.main and gen.world > 1 else None)
