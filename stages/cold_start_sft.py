"""Cold-start SFT (R1 §2.3.1): fine-tune the BASE model on a small set of long, readable CoT examples before reasoning RL.

The set is a given dataset (`cold_start_sft.data`), or is built here by rejection-sampling the R1-Zero model and
keeping only readable samples: correct, well-formed (`<think>…</think><answer>…</answer>`), one language, not cut off,
no duplicates (the paper also gathered few-shot and human-refined data; R1-Zero outputs filtered for readability are
the part that runs offline).

mlflow is imported inside functions: the registry imports every stage, and `r1 validate` must start fast.
"""

from __future__ import annotations

import logging
import warnings

from grpo.distributed import broadcast
from stages.core import tracking
from stages.core.context import stage_context
from stages.core.data import load_cot_dataset, load_problems, load_rows, save_rows
from stages.core.lineage import resolve_input
from stages.core.models import load_model_and_tokenizer, pick_device
from stages.core.recipe import Recipe
from stages.core.rejection import Filters, RejectionSampler, load_backend
from stages.core.sft_runner import train_and_finish
from stages.core.sharding import generation_rank, sample_sharded

log = logging.getLogger(__name__)

STAGE = "cold_start_sft"
UPSTREAM = {"model": ("base_model", "model"), "r1_zero_model": ("r1_zero", "model")}
SHARD_ROWS = 256  # rows per sampling shard (resume granularity)


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    cfg = recipe.cold_start_sft
    base_uri = resolve_input(recipe, inputs, "model", *UPSTREAM["model"])
    examples, problems, r1_uri = None, None, None
    if cfg.data is not None:
        examples = load_cot_dataset(cfg.data, recipe.prompt, cfg.target_size)  # bad data fails here
        stage_inputs = {"model": base_uri}  # the data set is named by the config, hence by the stage key
    else:
        r1_uri = resolve_input(recipe, inputs, "r1_zero_model", *UPSTREAM["r1_zero_model"])
        problems = load_problems(cfg.prompt_data or recipe.r1_zero.data, "train", n=cfg.num_prompts,
                                 seed=recipe.seed + 1)
        stage_inputs = {"model": base_uri, "r1_zero_model": r1_uri}
        if cfg.rollout_backend == "vllm":
            from grpo.rollout_vllm import check_vllm_installed  # lazy: imports torch

            check_vllm_installed()  # a missing vLLM fails before any model loads
    with stage_context(recipe, STAGE, cfg, stage_inputs, parent_run_id, progress) as ctx:
        if examples is None:  # on several ranks: each samples its share, rank 0 merges, the others receive the set
            examples = broadcast(readable_samples(ctx, r1_uri, problems))
        if ctx.main:
            log_data(ctx, examples, cfg.samples_to_log)
        model, tok = load_model_and_tokenizer(base_uri, pick_device(recipe.device), recipe.base_model.trust_remote_code)
        return train_and_finish(ctx, cfg.sft, model, tok, examples,
                                extra_outputs={"data": f"runs:/{ctx.run_id}/data"})


def readable_samples(ctx, r1_uri: str, problems) -> list[dict] | None:
    """Rejection-sample the R1-Zero model up to target_size readable samples on every rank (stages.core.sharding);
    rank 0 returns the merged set, the others None. A rerun reuses the work dir's set (so a resumed SFT trains on the
    same examples)."""
    import mlflow

    cfg, recipe = ctx.recipe.cold_start_sft, ctx.recipe
    cached = ctx.workdir / "data"
    if broadcast(cached.exists()):  # rank 0 decides: every rank takes the same path
        log.info("cold_start_sft: reusing the sampled set in %s", cached)
        return load_rows(cached) if ctx.main else None
    sampler = RejectionSampler(None, problems, source_run=r1_uri, prompt=recipe.prompt,
                               samples_per_prompt=cfg.samples_per_prompt,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                               filters=Filters(max_completion_tokens=cfg.max_completion_tokens),
                               batch_prompts=cfg.batch_prompts, seed=recipe.seed,
                               seeded_completions=cfg.rollout_backend == "vllm")
    merged = sample_sharded(sampler, lambda: load_backend(r1_uri, cfg, recipe), cfg.target_size,
                            ctx.workdir / "shards", SHARD_ROWS, gen=generation_rank(cfg.vllm_tensor_parallel_size),
                            label="cold-start sampling", progress=ctx.progress)
    del sampler  # the R1-Zero model: SFT trains the base model next
    if not ctx.main:
        return None
    rows, counts = merged
    mlflow.log_metrics(counts.metrics("cold_start/") | {"cold_start/examples": len(rows)})
    if not rows:
        raise RuntimeError(f"cold_start_sft: no readable sample from the R1-Zero model {r1_uri}: {counts.why()}. "
                           "Raise num_prompts / samples_per_prompt, or give a dataset (cold_start_sft.data)")
    if len(rows) < cfg.target_size:
        msg = (f"cold_start_sft: kept {len(rows)} of target_size={cfg.target_size} readable samples from "
               f"{len(problems)} prompts: {counts.why()}")
        mlflow.set_tag("r1.cold_start_sft.target_not_reached", msg[:5000])
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    save_rows(rows, cached)
    return rows


def log_data(ctx, examples: list[dict], samples_to_log: int) -> None:
    """The training set as the run's `data/` artifact, and a sample table."""
    import mlflow

    folder = ctx.workdir / "data"
    if not folder.exists():
        save_rows(examples, folder)
    mlflow.log_artifacts(str(folder), artifact_path="data")
    mlflow.log_metric("data/examples", len(examples))
    tracking.log_dataset(examples, "cold_start", f"runs:/{ctx.run_id}/data", "training")
    shown = examples[:samples_to_log]
    if shown:
        mlflow.log_table({c: [str(r.get(c, "")) for r in shown] for c in shown[0]}, "data_samples.json")
