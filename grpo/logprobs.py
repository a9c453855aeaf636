"""Log-probabilities of the chosen completion tokens, and per-token entropy, in one pass.

Only completion positions are projected onto the vocabulary (hidden states are sliced before the LM head), and the
projection + log-softmax runs over chunks of positions. When the batch's vocabulary logits would be large (over
CHECKPOINT_ABOVE elements, 64 MB in fp32), each chunk runs under activation checkpointing: peak memory then holds one
chunk of logits, never the whole batch's; below that, recomputing them in the backward pass would only cost time.
Logits are divided by the sampling temperature, so that the ratio and the KL are measured on the distribution that was
sampled.

`packed_completion_logprobs` is the trainer's path: a rollout is left-padded prompts then right-padded completions, so a
batch padded to the longest prompt and the longest completion spends a third of its positions on padding. It moves
each row's tokens to the start of the row (plain causal attention, positions from 0, the same numbers as the padded
layout), sorts rows by length into a few buckets each cut to its own longest row, and projects only the positions that
predict a real completion token. For Llama-family models `shared_prompt_logprobs` also computes each prompt once per
group instead of once per completion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from grpo.decoding import _linear_add, _rms_norm, fused_weights, supports


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as Hugging Face `generate` computes them (so training sees what sampling saw)."""
    pos = attention_mask.long().cumsum(dim=-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


CHECKPOINT_ABOVE = 2**24  # vocabulary logits (positions x vocab) above which the LM head runs under checkpointing


def _chosen_logp_and_entropy(hidden: torch.Tensor, lm_head, tokens: torch.Tensor, temperature: float,
                             with_entropy: bool = True):
    logits = lm_head(hidden).float() / temperature  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return chosen, torch.zeros_like(lse, requires_grad=False)
    with torch.no_grad():  # entropy is a diagnostic: H = logsumexp − Σ p·logit
        probs = torch.softmax(logits.detach(), dim=-1)
        entropy = lse.detach() - (probs * logits.detach()).sum(dim=-1)
    return chosen, entropy


def chosen_token_logprobs(
    hidden: torch.Tensor,
    lm_head,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(lm_head(h)/T)[token] and entropy (zeros if not with_entropy) for (N, T, H) hidden states that
    predict (N, T) tokens."""
    N, T, H = hidden.shape
    flat_h, flat_tok = hidden.reshape(N * T, H), tokens.reshape(N * T)
    vocab = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
    recompute = torch.is_grad_enabled() and hidden.requires_grad and N * T * vocab > CHECKPOINT_ABOVE
    logps, ents = [], []
    for start in range(0, N * T, chunk_size):
        h, tok = flat_h[start : start + chunk_size], flat_tok[start : start + chunk_size]
        if recompute:
            lp, ent = checkpoint(_chosen_logp_and_entropy, h, lm_head, tok, temperature, with_entropy,
                                 use_reentrant=False)
        else:
            lp, ent = _chosen_logp_and_entropy(h, lm_head, tok, temperature, with_entropy)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps).view(N, T), torch.cat(ents).view(N, T)


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), each (N, completion_len), for the last `completion_len` tokens of `input_ids`.

    `model` is a Hugging Face causal LM: its `base_model` gives hidden states, its output embeddings the LM head.
    The hidden state at position p predicts token p+1, so completion tokens P..P+T-1 use positions P-1..P+T-2.
    """
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, -completion_len - 1 : -1]
    tokens = input_ids[:, -completion_len:]
    return chosen_token_logprobs(hidden, model.get_output_embeddings(), tokens, temperature, chunk_size)


def _buckets(lengths: torch.Tensor, max_buckets: int, min_rows: int = 16) -> list[torch.Tensor]:
    """Row indices sorted by length, split into up to `max_buckets` groups of equal size (at least `min_rows` each)."""
    order = torch.argsort(lengths, stable=True)
    k = max(1, min(max_buckets, len(order) // min_rows))
    return [chunk for chunk in torch.tensor_split(order, k) if len(chunk)]


def packed_completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    max_buckets: int = 4,
    with_entropy: bool = True,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), each (N, T) like `completion_ids`, for left-padded prompts and right-padded completions;
    0 after each row's last completion token (the last 1 of `completion_mask`).

    Same values as `completion_logprobs` on the same rows (up to floating-point summation order), without computing
    padded positions: rows are re-laid out as [prompt, completion, padding] and run in length buckets. For a
    Llama-family model (and share_prompts) each distinct prompt is computed once: `shared_prompt_logprobs`.
    """
    if share_prompts and supports(model):
        return shared_prompt_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                      chunk_size, max_buckets, with_entropy)
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    device = completion_ids.device
    plen = prompt_mask.long().sum(dim=1)
    cols = torch.arange(T, device=device)
    clen = torch.where(completion_mask.bool(), cols + 1, 0).amax(dim=1) if T else plen.new_zeros(N)
    total = plen + clen
    width = int(total.max()) if N else 0
    # row i's real tokens start at column P - plen_i of [prompt | completion]; shift them to column 0
    seq = torch.cat([prompt_ids, completion_ids], dim=1)
    src = (torch.arange(width + 1, device=device) + (P - plen).unsqueeze(1)).clamp(max=P + T - 1)
    aligned = seq.gather(1, src)  # (N, width + 1); entries past a row's end are other real ids, never attended to

    hidden, tokens, dest = [], [], []
    for rows in _buckets(total, max_buckets):
        w = int(total[rows].max())
        out = model.base_model(input_ids=aligned[rows, :w], use_cache=False)
        k = torch.arange(w, device=device)
        p, c = plen[rows].unsqueeze(1), clen[rows].unsqueeze(1)
        predicts = (k >= p - 1) & (k < p + c - 1)  # hidden state at k predicts the token at k + 1
        hidden.append(out.last_hidden_state[predicts])
        tokens.append(aligned[rows, 1 : w + 1][predicts])
        dest.append((rows.unsqueeze(1) * T + cols)[cols < c])  # same row-major order as `predicts`
    logp, ent = chosen_token_logprobs(
        torch.cat(hidden).unsqueeze(0), model.get_output_embeddings(), torch.cat(tokens).unsqueeze(0), temperature,
        chunk_size, with_entropy,
    )
    dest = torch.cat(dest)
    zeros = logp.new_zeros(N * T)
    return zeros.index_put((dest,), logp[0]).view(N, T), zeros.index_put((dest,), ent[0]).view(N, T)


def _attend(layer, fused, x, cos, sin_signed, keys_prefix, values_prefix, mask, dims):
    """One Llama-family decoder layer on x (n, L, H); the queries attend to [prefix keys | own keys] under the additive
    `mask` (n*nkv, groups*L, S) (`grouped_mask`). Returns the new x and this layer's (keys, values) of x, each
    (n, nkv, L, hd). The same operations as the decoding step (grpo.decoding), with autograd."""
    nh, nkv, hd = dims
    n, L, H = x.shape
    a, m = layer.self_attn, layer.mlp
    w_qkv, b_qkv, w_gu = fused
    qkv = F.linear(_rms_norm(x, layer.input_layernorm), w_qkv, b_qkv)
    qkv = qkv.view(n, L, nh + 2 * nkv, hd).transpose(1, 2)
    qk = qkv[:, : nh + nkv]
    qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin_signed)  # rotary, as in grpo.decoding
    k, v = qk[:, nh:], qkv[:, nh + nkv :]
    keys = k if keys_prefix is None else torch.cat([keys_prefix, k], dim=2)
    values = v if values_prefix is None else torch.cat([values_prefix, v], dim=2)
    S, g = keys.shape[2], nh // nkv
    scores = torch.baddbmm(mask, qk[:, :nh].reshape(n * nkv, g * L, hd), keys.reshape(n * nkv, S, hd).transpose(1, 2),
                           alpha=a.scaling)
    o = torch.bmm(torch.softmax(scores, dim=-1), values.reshape(n * nkv, S, hd))
    o = o.view(n, nh, L, hd).transpose(1, 2).reshape(n * L, nh * hd)
    x = _linear_add(x.reshape(n * L, H), o, a.o_proj.weight, a.o_proj.bias)
    gate, up = F.linear(_rms_norm(x, layer.post_attention_layernorm), w_gu).chunk(2, dim=-1)
    x = _linear_add(x, F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias)
    return x.view(n, L, H), (k, v)


def grouped_mask(allowed: torch.Tensor, nh: int, nkv: int) -> torch.Tensor:
    """(n, L, S) allowed keys → the additive mask (n*nkv, groups*L, S) of the grouped scores in `_attend`."""
    n, L, S = allowed.shape
    add = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return add.unsqueeze(1).expand(n, nh, L, S).reshape(n * nkv, (nh // nkv) * L, S)


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
    """`packed_completion_logprobs` for Llama-family models (grpo.decoding.supports), computing each distinct prompt
    once: the G completions of a group share their prompt's keys and values (causal attention: a prompt's states do
    not depend on what follows it), so prompt tokens cost 1/G of a padded batch's. Completions then run in length
    buckets, their queries attending to [their prompt's keys | their own causal keys]. Same values and gradients
    as the padded layout, up to floating-point summation order."""
    base = model.model
    cfg = model.config
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    dims = (nh, nkv, hd)
    N, P = prompt_ids.shape
    T = completion_ids.shape[1]
    device = completion_ids.device
    cols = torch.arange(T, device=device)
    clen = torch.where(completion_mask.bool(), cols + 1, 0).amax(dim=1)
    plen = prompt_mask.long().sum(dim=1)
    uniq, group = torch.unique(prompt_ids, dim=0, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long, device=device).scatter_(0, group, torch.arange(N, device=device))
    u_mask = prompt_mask[first].bool()

    # rotary tables for every position, from the model's own rotary module
    positions = torch.arange(P + T, device=device).unsqueeze(0)
    cos_all, sin_all = base.rotary_emb(base.embed_tokens.weight[:1].unsqueeze(0), positions)
    cos_all, sin_all = cos_all[0], sin_all[0]
    half = hd // 2
    sin_all = torch.cat([-sin_all[:, :half], sin_all[:, half:]], dim=-1)  # the sign of rotate_half folded in

    # 1. each distinct prompt once (left-padded: positions skip the padding; a padding query attends to itself)
    pos = (u_mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask = grouped_mask((causal & u_mask[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device), nh, nkv)
    x = base.embed_tokens(uniq)
    cos, sin = cos_all[pos].unsqueeze(1), sin_all[pos].unsqueeze(1)
    prompt_kv = []
    fused = [fused_weights(layer) for layer in base.layers]  # once per pass, shared by the buckets
    for layer, fw in zip(base.layers, fused):
        x, kv = _attend(layer, fw, x, cos, sin, None, None, mask, dims)
        prompt_kv.append(kv)
    last_prompt_hidden = base.norm(x[:, -1])  # predicts each completion's first token

    # 2. completions in length buckets; token j of a row sits at position plen + j
    hidden, tokens, dest = [], [], []
    for rows in _buckets(clen, max_buckets):
        c = clen[rows]
        w = max(int(c.max()) - 1, 0)  # the last completion token predicts nothing
        g = group[rows]
        h_first = last_prompt_hidden[g].unsqueeze(1)
        if w > 0:
            ids = completion_ids[rows, :w]
            pos = plen[rows].unsqueeze(1) + torch.arange(w, device=device)
            cos, sin = cos_all[pos].unsqueeze(1), sin_all[pos].unsqueeze(1)
            keys_ok = torch.cat(
                [u_mask[g][:, None, :].expand(-1, w, -1), torch.ones(w, w, dtype=torch.bool, device=device).tril()
                 .expand(len(rows), -1, -1)], dim=2,
            )
            keys_ok = grouped_mask(keys_ok, nh, nkv)
            x = base.embed_tokens(ids)
            for layer, fw, (pk, pv) in zip(base.layers, fused, prompt_kv):
                x, _ = _attend(layer, fw, x, cos, sin, pk[g], pv[g], keys_ok, dims)
            h_all = torch.cat([h_first, base.norm(x)], dim=1)  # (n, w + 1, H): hidden predicting token j
        else:
            h_all = h_first
        predicts = torch.arange(w + 1, device=device) < c.unsqueeze(1)
        hidden.append(h_all[predicts])
        tokens.append(completion_ids[rows, : w + 1][predicts])
        dest.append((rows.unsqueeze(1) * T + cols)[cols < c.unsqueeze(1)])
    logp, ent = chosen_token_logprobs(
        torch.cat(hidden).unsqueeze(0), model.get_output_embeddings(), torch.cat(tokens).unsqueeze(0), temperature,
        chunk_size, with_entropy,
    )
    dest = torch.cat(dest)
    zeros = logp.new_zeros(N * T)
    return zeros.index_put((dest,), logp[0]).view(N, T), zeros.index_put((dest,), ent[0]).view(N, T)

