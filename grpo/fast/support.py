"""Which path runs: the hand-written fast path or the Hugging Face reference (forward, `generate`).

`use_fast_path` is the one switch, for sampling and for log-probs alike; it logs one info line per process per
(model class, reason), saying which path runs and why."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # each tested against the reference in its dtype
_announced: set[tuple[str, str]] = set()


def unsupported_reason(model) -> str | None:
    """None for a plain Qwen2 or Llama causal LM (unpartitioned weights, SiLU MLP without bias, default RoPE, full
    attention, no attention dropout, plain nn.Linear projections, every weight in one of SUPPORTED_DTYPES);
    otherwise what rules the fast path out."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if cfg is None or model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={cfg.pretraining_tp}"
    if getattr(cfg, "mlp_bias", False):
        return "the MLP has biases"
    if getattr(cfg, "attention_dropout", 0.0):
        return f"attention_dropout={cfg.attention_dropout}"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "some layers use sliding-window attention"
    base = getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") != "default":
        return f"rope_type {getattr(rotary, 'rope_type', None)!r} is not default"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "ZeRO-3 partitioned weights"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return f"weights in {names} (the fast path runs one of float32, bfloat16, float16)"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(lin) is not torch.nn.Linear for lin in linears):  # LoRA, quantised: more than .weight
            return "a projection is not a plain nn.Linear (LoRA, quantised?)"
        if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return "a layer norm is not an RMSNorm"
    if type(model.get_output_embeddings()) is not torch.nn.Linear or not hasattr(base.norm, "variance_epsilon"):
        return "the LM head is not a plain nn.Linear or the final norm not an RMSNorm"
    return None


def use_fast_path(model, off: str | None = None) -> bool:
    """True when the fast path runs for `model`; `off` names a caller's reason to use the reference anyway."""
    reason = off or unsupported_reason(model)
    name = type(model).__name__
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if reason is None else ""
    key = (name, reason or dtype)
    if key not in _announced:
        _announced.add(key)
        if reason is None:
            log.info("%s: hand-written fast path (static-KV sampling, shared-prompt log-probs): a supported "
                     "Qwen2/Llama model in %s", name, dtype)
        else:
            log.info("%s: Hugging Face reference path (generate, forward): %s", name, reason)
    return reason is None
