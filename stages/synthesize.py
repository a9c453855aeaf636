"""Synthesize: the SFT set of R1 §2.3.3 — reasoning samples rejection-sampled from the reasoning-RL model, plus general
(non-reasoning) samples. The paper keeps ~600k reasoning samples (correct, one language, clean format, not too long, no
duplicates) and adds ~200k general ones; here both counts are `reasoning_target` and `general_target`.

Resumable in shards: the reasoning rows are produced in shards of `shard_size` rows under `<workdir>/shards/`. A shard is
a folder (its rows, plus `state.json` with the position reached: next generation batch, the rows of that position not
yet in a shard, the cumulative counts) written under a temporary name and renamed, so it either exists whole or not at
all. A rerun (same config and input, hence the same work dir) reads the finished shards and continues from the last
one's position; since each generation batch is seeded by its index, the final rows equal an uninterrupted run's.

mlflow is imported inside functions: the registry imports every stage, and `r1 validate` must start fast.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from grpo.faults import fault_point
from stages.core import console, tracking
from stages.core.context import stage_context
from stages.core.data import load_problems, load_rows, save_rows
from stages.core.lineage import resolve_input
from stages.core.models import load_model_and_tokenizer, pick_device
from stages.core.recipe import Recipe
from stages.core.rejection import Counts, Filters, RejectionSampler

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
    with stage_context(recipe, STAGE, cfg, {"model": model_uri}, parent_run_id, progress) as ctx:
        reasoning, counts = sample_reasoning(ctx, model_uri, problems)
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


def sample_reasoning(ctx, model_uri: str, problems) -> tuple[list[dict], Counts]:
    """Rejection-sample up to reasoning_target rows, shard by shard, resuming from the work dir's finished shards."""
    cfg, recipe = ctx.recipe.synthesize, ctx.recipe
    shard_dir = ctx.workdir / "shards"
    rows, state = load_shards(shard_dir)
    if state is None:
        state = {"shard": -1, "next_batch": 0, "carry": [], "counts": Counts().to_json(),
                 "done": cfg.reasoning_target == 0 or not problems}
    counts = Counts.from_json(state["counts"])
    if state["done"]:
        if state["shard"] >= 0:
            log.info("synthesize: all %d shards already finished in %s", state["shard"] + 1, shard_dir)
        return rows, counts
    if state["shard"] >= 0:
        log.info("synthesize: resuming after shard %d (%d rows) at generation batch %d", state["shard"], len(rows),
                 state["next_batch"])

    model, tok = load_model_and_tokenizer(model_uri, pick_device(recipe.device), recipe.base_model.trust_remote_code)
    sampler = RejectionSampler(model, tok, problems, source_run=model_uri, prompt=recipe.prompt,
                               samples_per_prompt=cfg.samples_per_prompt,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, filters=filters_of(cfg),
                               batch_prompts=cfg.batch_prompts, seed=recipe.seed)
    target, buffer, shard = cfg.reasoning_target, list(state["carry"]), state["shard"] + 1
    bar = console.progress(target, "synthesize", ctx.progress, initial=len(rows) + len(buffer), unit="sample")

    def write_shards(next_batch: int, last: bool) -> bool:
        """Full shards from the buffer (all of it when `last`); True once the final shard is written."""
        nonlocal buffer, shard
        while len(buffer) >= cfg.shard_size or last:
            chunk, buffer = buffer[: cfg.shard_size], buffer[cfg.shard_size :]
            done = last and not buffer
            write_shard(shard_dir, shard, chunk, {"shard": shard, "rows": len(chunk), "next_batch": next_batch,
                                                  "carry": buffer, "counts": counts.to_json(), "done": done})
            rows.extend(chunk)
            # step = shards written (from 1: the end-of-stage summary is logged at step 0)
            ctx.logger.log_metrics(counts.metrics("synth/") | {"synth/kept": len(rows)}, step=shard + 1)
            fault_point(STAGE, shard + 1)
            shard += 1
            if done:
                return True
        return False

    if len(rows) + len(buffer) >= target or state["next_batch"] >= sampler.num_batches:
        # killed while writing the last batch's shards: write the rest of them, generate nothing more
        write_shards(state["next_batch"], last=True)
    else:
        for b, kept, batch_counts in sampler.batches(state["next_batch"]):
            take = kept[: target - len(rows) - len(buffer)]
            buffer.extend(take)
            counts.add(batch_counts)
            bar.update(len(take))
            bar.set_postfix(prompts=counts.prompts, accept=f"{counts.acceptance_rate:.0%}")
            if write_shards(b + 1, last=len(rows) + len(buffer) >= target or b == sampler.num_batches - 1):
                break
    bar.close()
    return rows, counts


def shard_path(shard_dir: Path, i: int) -> Path:
    return shard_dir / f"shard-{i:05d}"


def write_shard(shard_dir: Path, i: int, rows: list[dict], state: dict) -> Path:
    """Rows and state into a temporary folder, then one rename: a shard is whole or absent."""
    final = shard_path(shard_dir, i)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if rows:
        save_rows(rows, tmp / "rows")
    fault_point("shard_write", i + 1, by_stage=False)
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_shards(shard_dir: Path) -> tuple[list[dict], dict | None]:
    """Rows of the finished shards 0, 1, ... up to the first missing one, and the last one's state. Shards after a gap
    (and unfinished temporaries) are stale: removed, their batches are redone."""
    rows, state, i = [], None, 0
    while (shard_path(shard_dir, i) / "state.json").exists():
        d = shard_path(shard_dir, i)
        state = json.loads((d / "state.json").read_text())
        if state["rows"]:
            rows.extend(load_rows(d / "rows"))
        i += 1
    if shard_dir.exists():
        for stale in shard_dir.glob("shard-*"):
            if stale.name.endswith(".tmp") or int(stale.name.split("-")[1]) >= i:
                shutil.rmtree(stale, ignore_errors=True)
    return rows, state
