"""Log-probs of GRPO completions for Llama-family models, each distinct prompt computed once per group.

The G completions of a group share their prompt's keys and values (causal attention: a prompt's states do not depend
on what follows it), so prompt tokens cost 1/G of a padded batch's. A prompt pass runs each distinct prompt once; a
completion pass then runs the completions in length buckets, their queries attending to [their prompt's keys | their
own causal keys]. Same values and gradients as the padded layout (`grpo.logprobs.completion_logprobs`), up to
floating-point summation order; the fused weights are built once per call and shared by the buckets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from grpo.fast.decoder import distinct_prompts
from grpo.fast.ops import (
    additive_mask,
    attention_dims,
    fused_weights,
    linear_add,
    rms_norm,
    rotary_tables,
    rotate,
)
from grpo.logprobs import length_buckets, scatter_logprobs


def attend(layer, fused, x, cos, sin_signed, keys_prefix, values_prefix, mask, dims):
    """One Llama-family decoder layer on x (n, L, H); the queries attend to [prefix keys | own keys] under the additive
    `mask` (n, 1, L, S) (`additive_mask`). Returns the new x and this layer's (keys, values) of x, each
    (n, nkv, L, hd). The same operations as the decoding step (grpo.fast.decoder), with autograd, except attention:
    a fused kernel (`scaled_dot_product_attention`: memory-efficient/flash on CUDA, flash on CPU) that keeps no
    (L x S) scores for backward, which at 1k-token completions would be gigabytes per layer."""
    nh, nkv, hd = dims
    n, L, H = x.shape
    a, m = layer.self_attn, layer.mlp
    w_qkv, b_qkv, w_gu = fused
    qkv = F.linear(rms_norm(x, layer.input_layernorm), w_qkv, b_qkv)
    qkv = qkv.view(n, L, nh + 2 * nkv, hd).transpose(1, 2)
    qk = rotate(qkv[:, : nh + nkv], cos, sin_signed)
    k, v = qk[:, nh:], qkv[:, nh + nkv :]
    keys = k if keys_prefix is None else torch.cat([keys_prefix, k], dim=2)
    values = v if values_prefix is None else torch.cat([values_prefix, v], dim=2)
    o = F.scaled_dot_product_attention(qk[:, :nh], keys, values, attn_mask=mask, scale=a.scaling,
                                       enable_gqa=nh != nkv)
    o = o.transpose(1, 2).reshape(n * L, nh * hd)
    x = linear_add(x.reshape(n * L, H), o, a.o_proj.weight, a.o_proj.bias)
    gate, up = F.linear(rms_norm(x, layer.post_attention_layernorm), w_gu).chunk(2, dim=-1)
    x = linear_add(x, F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias)
    return x.view(n, L, H), (k, v)


def run_layer(layer, *args):
    """`attend(layer, *args)`, under non-reentrant activation checkpointing where the Hugging Face forward would
    checkpoint this decoder layer (its `gradient_checkpointing` flag, set by `gradient_checkpointing_enable`) and a
    backward will follow: the layer's activations are recomputed in the backward pass instead of kept."""
    if torch.is_grad_enabled() and getattr(layer, "gradient_checkpointing", False):
        return checkpoint(attend, layer, *args, use_reentrant=False)
    return attend(layer, *args)


def prompt_pass(model, prompts, prompt_mask, fused, rotary):
    """Each distinct left-padded prompt (u, P) once (positions skip the padding; a padding query attends to itself).
    Returns every layer's prompt (keys, values) and the final hidden state of the last prompt token, which predicts
    the first completion token."""
    base, dims = model.model, attention_dims(model.config)
    P = prompts.shape[1]
    cos_all, sin_all = rotary
    pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(P, P, dtype=torch.bool, device=prompts.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=prompts.device)
    mask = additive_mask((causal & prompt_mask[:, None, :]) | eye, base.embed_tokens.weight.dtype)
    x = base.embed_tokens(prompts)
    cos, sin = cos_all[pos].unsqueeze(1), sin_all[pos].unsqueeze(1)
    prompt_kv = []
    for layer, fw in zip(base.layers, fused):
        x, kv = run_layer(layer, fw, x, cos, sin, None, None, mask, dims)
        prompt_kv.append(kv)
    return prompt_kv, base.norm(x[:, -1])


def completion_pass(model, ids, start, prompt_kv, prompt_of_row, prompt_keys_ok, fused, rotary):
    """Completion tokens `ids` (n, w), row i continuing distinct prompt `prompt_of_row[i]` (its keys and values in
    `prompt_kv`, its real keys `prompt_keys_ok` (n, P)); token j at rotary position start + j (start (n, 1): the
    prompt's length). Final hidden states (n, w, H)."""
    base, dims = model.model, attention_dims(model.config)
    n, w = ids.shape
    cos_all, sin_all = rotary
    pos = start + torch.arange(w, device=ids.device)
    cos, sin = cos_all[pos].unsqueeze(1), sin_all[pos].unsqueeze(1)
    own = torch.ones(w, w, dtype=torch.bool, device=ids.device).tril().expand(n, -1, -1)
    allowed = torch.cat([prompt_keys_ok[:, None, :].expand(-1, w, -1), own], dim=2)
    mask = additive_mask(allowed, base.embed_tokens.weight.dtype)
    x = base.embed_tokens(ids)
    for layer, fw, (pk, pv) in zip(base.layers, fused, prompt_kv):
        x, _ = run_layer(layer, fw, x, cos, sin, pk[prompt_of_row], pv[prompt_of_row], mask, dims)
    return base.norm(x)


def shared_prompt_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    max_buckets: int = 4,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), each (N, T) like `completion_ids`, for left-padded prompts and right-padded completions;
    0 after each row's last completion token (the last 1 of `completion_mask`). `grpo.logprobs.
    packed_completion_logprobs` computes the same with the model's Hugging Face forward."""
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    device = completion_ids.device
    cols = torch.arange(T, device=device)
    clen = torch.where(completion_mask.bool(), cols + 1, 0).amax(dim=1)
    plen = prompt_mask.long().sum(dim=1)
    uniq, group, first = distinct_prompts(prompt_ids)
    u_mask = prompt_mask[first].bool()
    rotary = rotary_tables(model, P + T)
    fused = [fused_weights(layer) for layer in model.model.layers]  # once per pass, shared by the buckets
    prompt_kv, last_prompt_hidden = prompt_pass(model, uniq, u_mask, fused, rotary)

    hidden, tokens, dest = [], [], []
    for rows in length_buckets(clen, max_buckets):
        c, g = clen[rows], group[rows]
        w = max(int(c.max()) - 1, 0)  # the last completion token predicts nothing
        h_all = last_prompt_hidden[g].unsqueeze(1)  # (n, w + 1, H): the hidden state predicting token j
        if w > 0:
            h = completion_pass(model, completion_ids[rows, :w], plen[rows].unsqueeze(1), prompt_kv, g, u_mask[g],
                                fused, rotary)
            h_all = torch.cat([h_all, h], dim=1)
        predicts = torch.arange(w + 1, device=device) < c.unsqueeze(1)
        hidden.append(h_all[predicts])
        tokens.append(completion_ids[rows, : w + 1][predicts])
        dest.append((rows.unsqueeze(1) * T + cols)[cols < c.unsqueeze(1)])
    return scatter_logprobs(model, hidden, tokens, dest, (N, T), temperature, chunk_size, with_entropy)
