"""The building blocks both fast-path passes share: fused projection weights, RMSNorm, residual-add matmuls, rotary
tables and rotation, the training pass's attention mask and the decoder's softmax of attention scores.

All follow the Hugging Face Qwen2/Llama modules op for op where it matters for the numbers (RMSNorm statistics in
float32 then scaled in the input dtype, rotary tables from the model's own rotary module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_dims(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Llama-family config."""
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    return nh, nkv, hd


def cat_bias(*linears) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else lin.weight.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])


def fused_weights(layer) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(q|k|v weight, its bias, gate|up weight) of a decoder layer, concatenated so each is one matmul. The training
    pass builds them once and shares them across its buckets (autograd sums the buckets' gradients, then splits)."""
    a, m = layer.self_attn, layer.mlp
    return (
        torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
        cat_bias(a.q_proj, a.k_proj, a.v_proj),
        torch.cat([m.gate_proj.weight, m.up_proj.weight]),
    )


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """Qwen2RMSNorm / LlamaRMSNorm: computed in float32, scaled in the input dtype."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * xf.to(x.dtype)


def rms_norm_nograd(x: torch.Tensor, norm) -> torch.Tensor:
    """`rms_norm` for fp32 without autograd, with in-place steps (the same operations in the same order)."""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return rms_norm(x, norm)
    r = x.pow(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_()
    return (x * r).mul_(norm.weight)


def linear_add(x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + inp @ weight.T (+ bias) for 2-D x and inp, the residual add done by the matmul (addmm, beta=1) in fp32.
    In bf16/fp16 the projection is rounded to the dtype before the add, as the Hugging Face modules do (addmm rounds
    once, which is other numbers: greedy tokens would part from `generate`'s at near-ties)."""
    if bias is not None or x.dtype != torch.float32:
        return x + F.linear(inp, weight, bias)
    return torch.addmm(x, inp, weight.t())


def rotary_tables(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each (length, head_dim), for positions 0..length-1 from the model's own rotary module, in
    its weights' dtype; the sign of rotate_half is folded into the sin table (see `rotate`)."""
    base = model.model
    w = base.embed_tokens.weight
    positions = torch.arange(length, device=w.device).unsqueeze(0)
    cos, sin = base.rotary_emb(w[:1].unsqueeze(0), positions)
    cos, sin = cos[0], sin[0]
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of queries and keys at once: x·cos + rotate_half(x)·sin, where
    rotate_half(x) = roll(x, half)·[-1 … 1 …], the sign folded into sin_signed."""
    return torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), sin_signed)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, L, S) allowed keys → the additive mask (n, 1, L, S) in the queries' dtype: 0 where allowed, the most
    negative finite value elsewhere (every query keeps one allowed key, so no row is all masked). Built once per
    pass and shared by the layers: `scaled_dot_product_attention` would convert a boolean mask, and keep the copy
    for backward, in every layer."""
    add = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return add.unsqueeze(1)


def attention_probs(scores: torch.Tensor) -> torch.Tensor:
    """softmax over keys, computed in float32 and returned in the scores' dtype, as Hugging Face's eager attention.
    Decoding only (no autograd): the training pass uses `scaled_dot_product_attention`, which keeps no scores."""
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
