"""Cold-start SFT (R1 §2.3.1): fine-tune the BASE model on a small set of long, readable CoT examples before reasoning RL.

The set is a given dataset (`cold_start_sft.data`), or is built here by rejection-sampling the R1-Zero model and
keeping only readable samples: correct, well-formed (`<think>…</think><answer>…</answer>`), one language, not cut off,
no duplicates (the paper also gathered few-shot and human-refined data; R1-Zero outputs filtered for readability are
the part that runs offline).
"""

from __future__ import annotations

import logging
import re

from stages.common import resolve_input, stage_context
from stages.recipe import Recipe

log = logging.getLogger(__name__)

STAGE = "cold_start_sft"
UPSTREAM = {"model": ("base_model", "model"), "r1_zero_model": ("r1_zero", "model")}
COLUMNS = ("prompt", "completion", "question", "answer")


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    cfg = recipe.cold_start_sft
    base_uri = resolve_input(recipe, inputs, "model", *UPSTREAM["model"])
    examples, problems, r1_uri = None, None, None
    if cfg.data is not None:
        examples = load_cot_dataset(cfg.data, recipe.prompt.template, cfg.target_size)  # bad data fails here
        stage_inputs = {"model": base_uri}  # the data set is named by the config, hence by the stage key
    else:
        from stages.data import load_problems

        r1_uri = resolve_input(recipe, inputs, "r1_zero_model", *UPSTREAM["r1_zero_model"])
        problems = load_problems(cfg.prompt_data or recipe.r1_zero.data, "train", n=cfg.num_prompts,
                                 seed=recipe.seed + 1)
        stage_inputs = {"model": base_uri, "r1_zero_model": r1_uri}
    with stage_context(recipe, STAGE, cfg, stage_inputs, parent_run_id, progress) as ctx:
        if examples is None:  # on several ranks: rank 0 samples the set, the others receive it
            from grpo.distributed import broadcast

            examples = broadcast(readable_samples(ctx, r1_uri, problems) if ctx.main else None)
        if ctx.main:
            log_data(ctx, examples, cfg.samples_to_log)
        from stages.models import load_model_and_tokenizer, pick_device

        model, tok = load_model_and_tokenizer(base_uri, pick_device(recipe.device), recipe.base_model.trust_remote_code)
        return train_and_finish(ctx, cfg.sft, model, tok, examples,
                                extra_outputs={"data": f"runs:/{ctx.run_id}/data"})


def readable_samples(ctx, r1_uri: str, problems) -> list[dict]:
    """Rejection-sample the R1-Zero model up to target_size readable samples; reuse the work dir's set on a rerun (so a
    resumed SFT trains on the same examples)."""
    import warnings

    import mlflow

    from stages.data import load_rows, save_rows
    from stages.models import load_model_and_tokenizer, pick_device
    from stages.rejection import Filters, RejectionSampler, rejection_sample

    cfg, recipe = ctx.recipe.cold_start_sft, ctx.recipe
    cached = ctx.workdir / "data"
    if cached.exists():
        log.info("cold_start_sft: reusing the sampled set in %s", cached)
        return load_rows(cached)
    model, tok = load_model_and_tokenizer(r1_uri, pick_device(recipe.device), recipe.base_model.trust_remote_code)
    sampler = RejectionSampler(model, tok, problems, source_run=r1_uri, template=recipe.prompt.template,
                               target_language=recipe.prompt.target_language, samples_per_prompt=cfg.samples_per_prompt,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                               filters=Filters(max_completion_tokens=cfg.max_completion_tokens),
                               batch_prompts=cfg.batch_prompts, seed=recipe.seed)
    res = rejection_sample(sampler, cfg.target_size, progress=ctx.progress)
    mlflow.log_metrics(res.counts.metrics("cold_start/") | {"cold_start/examples": len(res.rows)})
    if not res.rows:
        raise RuntimeError(f"cold_start_sft: no readable sample from the R1-Zero model {r1_uri}: {res.counts.why()}. "
                           "Raise num_prompts / samples_per_prompt, or give a dataset (cold_start_sft.data)")
    if not res.reached:
        msg = (f"cold_start_sft: kept {len(res.rows)} of target_size={cfg.target_size} readable samples from "
               f"{len(problems)} prompts: {res.counts.why()}")
        mlflow.set_tag("r1.cold_start_sft.target_not_reached", msg[:5000])
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    del model
    save_rows(res.rows, cached)
    return res.rows


def log_data(ctx, examples: list[dict], samples_to_log: int) -> None:
    """The training set as the run's `data/` artifact, and a sample table."""
    import mlflow

    from stages.data import save_rows

    folder = ctx.workdir / "data"
    if not folder.exists():
        save_rows(examples, folder)
    mlflow.log_artifacts(str(folder), artifact_path="data")
    mlflow.log_metric("data/examples", len(examples))
    shown = examples[:samples_to_log]
    if shown:
        mlflow.log_table({c: [str(r.get(c, "")) for r in shown] for c in shown[0]}, "data_samples.json")


def train_and_finish(ctx, sft_cfg, model, tok, examples: list[dict], extra_outputs: dict | None = None):
    """The SFT stages' common end: SFTTrainer on prompt/completion examples (resuming from the work dir's newest
    checkpoint), then save, log and evaluate the model. Under a launcher's process group it trains with DeepSpeed
    (the recipe's `cluster.deepspeed_config`) on every rank; rank 0 logs."""
    import mlflow

    from stages.common import finish_with_model
    from stages.distributed import deepspeed_config
    from stages.sft import SFTTrainer

    examples = [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
    trainer = SFTTrainer(model, tok, examples, sft_cfg, output_dir=ctx.workdir / "checkpoints", logger=ctx.logger,
                         progress=ctx.progress, deepspeed_config=deepspeed_config(ctx.recipe))
    if sft_cfg.checkpoint_every is None:  # a few checkpoints, so a killed run resumes
        trainer.cfg = sft_cfg.model_copy(update={"checkpoint_every": max(1, trainer.total_steps // 4)})
    res = trainer.train(resume_from="latest")
    if ctx.main:
        mlflow.log_metrics({"sft_final/loss": res.final_loss, "sft_final/steps": res.steps,
                            "sft_final/seconds": res.seconds, "sft_final/examples": len(examples)})
        if res.stopped_early:
            mlflow.set_tag("r1.sft.stopped_early", f"time limit at step {res.steps}")
    return finish_with_model(ctx, trainer.engine.module, tok, extra_outputs=extra_outputs, save=trainer.save_model)


def load_cot_dataset(src, template: str, limit: int | None = None) -> list[dict]:
    """Prompt/completion examples from a CoT dataset: columns `prompt` + `completion`, or `question` + `answer` +
    `completion` (the prompt is then the recipe template around the question). `src.columns` maps these names to the
    dataset's. Rows whose question is held out for evaluation are dropped (the prompt is matched against the template
    when there is no question column). The completion follows the prompt as is."""
    from stages.base_model import split_of
    from stages.data import DataInputError

    ds, where = _read_dataset(src)
    names = {ours: src.columns.get(ours, ours) for ours in COLUMNS}
    have = set(ds.column_names)

    def missing(*ours):
        return [f"{names[c]!r}" + (f" (for {c})" if names[c] != c else "") for c in ours if names[c] not in have]

    if missing("completion"):
        raise DataInputError(f"CoT dataset {where}: missing column {missing('completion')[0]}; it has "
                             f"{ds.column_names}. Map it with data.columns: {{completion: <col>}}")
    if names["prompt"] not in have and missing("question", "answer"):
        raise DataInputError(f"CoT dataset {where}: missing column(s) {', '.join(missing('question', 'answer'))} "
                             f"(needed without a {names['prompt']!r} column); it has {ds.column_names}")
    pattern = _template_pattern(template)
    out, held_out = [], 0
    for i, row in enumerate(ds):
        completion = row[names["completion"]]
        question = row.get(names["question"])
        if names["prompt"] in have:
            prompt = row[names["prompt"]]
            if question is None and (m := pattern.fullmatch(str(prompt))):
                question = m.group(1)
        else:
            prompt = template.format(question=question)
        if prompt is None or completion is None or not str(completion).strip():
            raise DataInputError(f"CoT dataset {where}: row {i} has an empty prompt or completion")
        if question is not None and split_of(str(question)) == "eval":
            held_out += 1
            continue
        answer = row.get(names["answer"])
        out.append({"prompt": str(prompt), "completion": str(completion),
                    "question": "" if question is None else str(question),
                    "answer": "" if answer is None else str(answer), "kind": "reasoning", "source_run": where,
                    "prompt_id": f"d{i}"})
        if limit and len(out) >= limit:
            break
    if held_out:
        log.info("CoT dataset %s: %d rows with held-out (eval) questions dropped", where, held_out)
    if not out:
        raise DataInputError(f"CoT dataset {where}: no usable rows ({held_out} held out for evaluation)")
    return out


def _template_pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition("{question}")
    return re.compile(re.escape(head) + "(.*)" + re.escape(tail), re.DOTALL)


def _read_dataset(src):
    """(dataset, its name for messages) from a DataSource with source path/hub."""
    from stages.data import read_dataset

    return read_dataset(src, "CoT dataset"), src.path
