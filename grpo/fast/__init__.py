"""The hand-written fast path for Llama-family models (Qwen2, Llama): sampling on a static KV cache
(`decoder`), log-probs with each prompt computed once per group (`shared_prompt`), both from fused weights and the
shared ops in `ops`. `use_fast_path` decides, for sampling and log-probs alike, whether it runs or the Hugging Face
reference does (`grpo.rollout`'s `generate`, `grpo.logprobs`).

The rest of grpo uses only these names: `use_fast_path` / `unsupported_reason` (the decision), `sample` (a rollout's
completion tokens), `shared_prompt_logprobs` (the trainer's log-probs) and `draw` (inverse-CDF sampling)."""

from grpo.fast.decoder import draw, sample
from grpo.fast.shared_prompt import shared_prompt_logprobs
from grpo.fast.support import unsupported_reason, use_fast_path

__all__ = ["draw", "sample", "shared_prompt_logprobs", "unsupported_reason", "use_fast_path"]
