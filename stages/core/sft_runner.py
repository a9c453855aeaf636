"""The SFT stages' common end (cold_start_sft, general_sft): train the loaded model on prompt/completion examples with
the SFT loop inside an open stage context, resuming from the work dir's checkpoints, then finish.

mlflow is imported inside functions: the stage modules import this one, and `r1 validate` must start fast.
"""

from __future__ import annotations

from stages.core.context import StageContext, finish_with_model
from stages.core.distributed import deepspeed_config
from stages.core.sft import SFTConfig, SFTTrainer


def train_and_finish(ctx: StageContext, sft_cfg: SFTConfig, model, tok, examples: list[dict],
                     extra_outputs: dict | None = None) -> dict[str, str]:
    """The SFT stages' common end: SFTTrainer on prompt/completion (or messages) examples (resuming from the work dir's newest
    checkpoint), then save, log and evaluate the model. Under a launcher's process group it trains with DeepSpeed
    (the recipe's `cluster.deepspeed_config`) on every rank; rank 0 logs."""
    import mlflow

    examples = [{k: e[k] for k in ("messages", "prompt", "completion") if k in e} for e in examples]
    sft_cfg = ctx.seeded(sft_cfg)
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
    with trainer.training.autocast():  # the evaluation runs in the stage's precision (bf16: the weights already are)
        return finish_with_model(ctx, trainer.engine.module, tok, extra_outputs=extra_outputs, save=trainer.save_model)
