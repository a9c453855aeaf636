"""grpo: the GRPO engine shared by every RL stage.

    from grpo import GRPOConfig, GRPOTrainer
    trainer = GRPOTrainer(model, tokenizer, GRPOConfig(...), dataset, [("accuracy", fn, 1.0), ...], logger=...)
    trainer.train()

Modules: config (GRPOConfig), rollout (generation backends), logprobs (the Hugging Face reference), fast (the
hand-written fast path for Qwen2/Llama: sampling and log-probs), advantages, loss, trainer (the loop), training (the
scaffolding every loop shares: engine, non-finite guard, checkpoints, faults, loggers), engine (plain torch or
DeepSpeed), checkpoint, logging (metric loggers), distributed (rank helpers), rewards_io (calling reward functions).
Names are imported lazily so that `grpo.config` validates without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "GRPOConfig": "grpo.config",
    "GRPOTrainer": "grpo.trainer",
    "SamplingParams": "grpo.rollout",
    "Rollout": "grpo.rollout",
    "RolloutBackend": "grpo.rollout",
    "HFGenerateBackend": "grpo.rollout",
    "rollout_from_completions": "grpo.rollout",
    "group_advantages": "grpo.advantages",
    "process_advantages": "grpo.advantages",
    "kl_k1": "grpo.loss",
    "kl_k2": "grpo.loss",
    "kl_k3": "grpo.loss",
    "clipped_surrogate": "grpo.loss",
    "aggregate": "grpo.loss",
    "grpo_loss": "grpo.loss",
    "completion_logprobs": "grpo.logprobs",
    "MetricLogger": "grpo.logging",
    "MLflowLogger": "grpo.logging",
    "ConsoleLogger": "grpo.logging",
    "NullLogger": "grpo.logging",
    "RewardError": "grpo.rewards_io",
    "latest_checkpoint": "grpo.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'grpo' has no attribute {name!r}")
