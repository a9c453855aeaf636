"""Stage 0: the `tiny` base model, a stand-in for a pretrained base since no hub is reachable.

Build a BPE tokenizer and a small Qwen2-architecture model, and pretrain it on deliberately flawed R1-formatted traces
(stages.core.tasks.noisy_trace): some answers wrong, some traces without tags, some steps with Chinese words. The result
shows R1-Zero's flaws, so every later stage has something real to fix.

Pretraining is bounded by optimiser steps, which keeps the build deterministic for a seed; `pretrain_seconds` is only a
safety cap (hitting it is logged, since the result then depends on machine speed).

torch, transformers and mlflow are imported inside functions: the registry imports every stage, and `r1 validate`
must start fast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stages.core import tracking
from stages.core.context import finish_with_model, stage_context
from stages.core.heldout import pretraining_texts
from stages.core.models import check_model_dir, load_model, load_tokenizer, resolve_model_uri
from stages.core.recipe import Recipe
from stages.core.sft import SFTConfig, SFTTrainer
from stages.core.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    path: Path
    num_parameters: int
    steps: int
    final_loss: float
    seconds: float
    hit_time_cap: bool


def build_base_model(recipe: Recipe, out_dir: str | Path, on_step=None, progress: bool = True,
                     pairs: list[tuple[str, str]] | None = None) -> BuildResult:
    """Build, pretrain and save the tiny base model to `out_dir` (a Hugging Face directory, safetensors). `pairs`: the
    recipe's `pretraining_texts`, when the caller already made them."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = recipe.base_model
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    pairs = pairs if pairs is not None else pretraining_texts(recipe)
    tok = train_tokenizer((p + c for p, c in pairs), vocab_size=cfg.model.vocab_size)
    arch = cfg.model
    model_cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(model_cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    log.info("base model: %d parameters, vocab %d, %d pretraining traces", n_params, len(tok), len(pairs))

    sft_cfg = SFTConfig(max_steps=cfg.max_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                        warmup_steps=max(1, cfg.max_steps // 20), weight_decay=0.01, max_grad_norm=1.0,
                        max_length=arch.max_position_embeddings, seed=recipe.seed + 1,
                        time_limit_seconds=cfg.pretrain_seconds, log_every=10,
                        group_by_length=False)  # length tracks the flaw type here: keep batches mixed
    examples = [{"prompt": p, "completion": c} for p, c in pairs]
    logger = _StepCallback(on_step) if on_step else None
    res = SFTTrainer(model, tok, examples, sft_cfg, logger=logger, progress=progress, desc="pretrain").train()
    if res.stopped_early:
        log.warning("pretraining hit its %.0f s cap at step %d; the build is no longer seed-deterministic",
                    cfg.pretrain_seconds, res.steps)
    steps, loss, seconds, capped = res.steps, res.final_loss, res.seconds, res.stopped_early

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {
        "kind": "r1-tiny-base",
        "recipe": recipe.name,
        "seed": recipe.seed,
        "task": cfg.task,
        "parameters": n_params,
        "steps": steps,
        "final_loss": loss,
        "noise": cfg.noise.model_dump(),
    }
    (out / "r1_model.json").write_text(json.dumps(meta, indent=2))
    return BuildResult(out, n_params, steps, loss, seconds, capped)


class _StepCallback:
    """Adapts the SFT loop's logger interface to an `on_step(step, metrics)` callback."""

    def __init__(self, fn):
        self.fn = fn

    def log_metrics(self, metrics, step):
        self.fn(step, metrics)

    def log_params(self, params):
        pass


STAGE = "base_model"


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    """The base-model stage: build (or adopt) the base model, evaluate it, log everything to one MLflow run.

    Returns {"run_id", "model"}; `model` is the URI later stages take as input (runs:/<id>/model). The base model
    has no upstream, so `inputs` is unused.
    """
    import mlflow

    cfg = recipe.base_model
    tracking.check_tracking(recipe.tracking)
    if cfg.source == "pretrained":
        check_model_dir(resolve_model_uri(cfg.path))  # fail before opening a run
    with stage_context(recipe, STAGE, cfg, {}, parent_run_id, progress) as ctx:
        if cfg.source == "build":
            def on_step(step, metrics):
                mlflow.log_metrics(metrics, step=step)

            pairs = pretraining_texts(recipe)  # made once: logged as the run's input, then trained on
            tracking.log_dataset([{"prompt": p, "completion": c} for p, c in pairs], "pretraining",
                                 tracking.data_source_uri(cfg, "train"), "training")
            res = build_base_model(recipe, ctx.workdir / "build", on_step=on_step, progress=progress, pairs=pairs)
            mlflow.log_metrics({"base/parameters": res.num_parameters, "base/steps": res.steps,
                                "base/final_loss": res.final_loss, "base/build_seconds": res.seconds})
            model_dir = res.path
        else:
            model_dir = check_model_dir(resolve_model_uri(cfg.path))
        model = load_model(model_dir, trust_remote_code=cfg.trust_remote_code)
        tok = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
        return finish_with_model(ctx, model, tok)
