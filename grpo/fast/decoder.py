"""Sampling for Llama-family decoders (Qwen2, Llama) with little Python per token: the rollout's hot loop.

Hugging Face `generate` spends most of a small model's decoding step outside the matmuls (a cache that grows by
`torch.cat`, masks rebuilt per token, logits processors). This loop runs the same model from its own weights:

- a static KV cache, allocated once for prompt + max_new_tokens positions, written in place; each distinct prompt
  is prefilled once and its cache copied to the G rows of its group;
- q/k/v and gate/up projections fused into one matmul each (weights concatenated once per call); the residual adds
  run inside the output matmuls (addmm), the attention scale and mask inside the score matmul (baddbmm), and queries
  and keys are rotated in one call. With a small model most of a decoding step is per-op overhead, paid even by the
  last few live rows, so fewer ops per step is what makes it faster;
- the cache is laid out (rows x kv heads, positions, head_dim), so attention reads it in place, without a copy;
- rows that have emitted EOS leave the batch: when an eighth of the batch has ended, the finished rows are dropped
  from the cache (compaction), and the loop stops as soon as every row has ended;
- sampling as in `generate` (logits / temperature, nucleus filter, softmax), but one uniform per row and an
  inverse-CDF lookup instead of `torch.multinomial`, which draws an exponential for every vocabulary entry.

The numbers are the model's own (same RMSNorm, rotary tables from the model's rotary module, same masking of left
padding): greedy tokens equal `generate`'s, sampled ones follow the same distribution (not the same random stream).
`grpo.fast.use_fast_path(model)` says when this path applies; the rollout backend uses `generate` otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo.fast.ops import (
    attention_dims,
    attention_probs,
    fused_weights,
    linear_add,
    rms_norm_nograd,
    rotary_tables,
    rotate,
)

COMPACT_FRACTION = 8  # compact when at least 1/8 of the live rows have ended


class StaticKVDecoder:
    """The model's weights, fused for decoding, plus a static KV cache for one batch."""

    def __init__(self, model, batch: int, max_len: int):
        base = model.model
        self.n_heads, self.n_kv, self.head_dim = attention_dims(model.config)
        self.scale = self.head_dim**-0.5
        self.embed = base.embed_tokens.weight
        self.norm = base.norm
        head = model.get_output_embeddings()
        self.lm_w, self.lm_b = head.weight, head.bias
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            w_qkv, b_qkv, w_gu = fused_weights(layer)
            self.layers.append((layer.input_layernorm, w_qkv, b_qkv, a.o_proj.weight, a.o_proj.bias,
                                layer.post_attention_layernorm, w_gu, m.down_proj.weight, m.down_proj.bias))
        # cos/sin for every position this batch can reach, from the model's own rotary module
        self.cos, self.sin_signed = rotary_tables(model, max_len)  # (max_len, head_dim)
        w = self.embed
        shape = (batch * self.n_kv, max_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in self.layers]

    def keep(self, rows: torch.Tensor, filled: int) -> None:
        """Keep batch rows `rows` (in that order, repeats allowed) of the cache; only its first `filled` columns
        hold anything, so only they are copied."""

        def select(cache: torch.Tensor) -> torch.Tensor:
            by_row = cache.view(-1, self.n_kv, *cache.shape[1:])
            out = cache.new_empty((len(rows), *by_row.shape[1:]))
            out[:, :, :filled] = by_row[:, :, :filled].index_select(0, rows)
            return out.view(-1, *cache.shape[1:])

        self.k = [select(k) for k in self.k]
        self.v = [select(v) for v in self.v]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (n, L, H) after the final norm for tokens `ids` (n, L) at rotary positions `pos` (n, L),
        written to cache columns start .. start+L-1. `mask` is additive, (n*nkv, groups*L, start+L) over the cached
        keys (`grouped`)."""
        n, L = ids.shape
        end = start + L
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        groups = nh // nkv
        x = F.embedding(ids, self.embed).view(n * L, -1)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin_signed[pos].unsqueeze(1)  # (n, 1, L, hd)
        for i, (ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gu, w_down, b_down) in enumerate(self.layers):
            qkv = F.linear(rms_norm_nograd(x, ln1), w_qkv, b_qkv).view(n, L, nh + 2 * nkv, hd).transpose(1, 2)
            qk = rotate(qkv[:, : nh + nkv], cos, sin)  # queries and keys at once (adjacent heads)
            k_cache, v_cache = self.k[i], self.v[i]  # (n*nkv, max_len, hd): each step reads them in place
            k_cache.view(n, nkv, -1, hd)[:, :, start:end] = qk[:, nh:]
            v_cache.view(n, nkv, -1, hd)[:, :, start:end] = qkv[:, nh + nkv :]
            # grouped-query attention without repeating the cache: (n*nkv, groups*L, hd) @ (n*nkv, hd, end), the
            # scale and the additive mask fused into the same call
            scores = torch.baddbmm(mask, qk[:, :nh].reshape(n * nkv, groups * L, hd),
                                   k_cache[:, :end].transpose(1, 2), alpha=self.scale)
            attn = torch.bmm(attention_probs(scores), v_cache[:, :end])
            attn = attn.view(n, nh, L, hd).transpose(1, 2).reshape(n * L, nh * hd)
            x = linear_add(x, attn, w_o, b_o)  # x + o_proj(attn)
            gate, up = F.linear(rms_norm_nograd(x, ln2), w_gu).chunk(2, dim=-1)
            x = linear_add(x, F.silu(gate).mul_(up), w_down, b_down)
        return rms_norm_nograd(x, self.norm).view(n, L, -1)

    def grouped(self, mask: torch.Tensor, L: int) -> torch.Tensor:
        """(n, 1, L, S) additive mask → (n*nkv, groups*L, S), the layout of the grouped scores."""
        n, S = mask.shape[0], mask.shape[-1]
        g = self.n_heads // self.n_kv
        return mask.expand(n, self.n_heads, L, S).reshape(n * self.n_kv, g * L, S)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_w, self.lm_b).float()


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Hugging Face's TopPLogitsWarper: drop the least likely tokens whose cumulative mass is <= 1 - top_p."""
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` (n, V), with probability probs[i, j]: the first j whose cumulative mass exceeds
    u·total for one uniform u per row. A token of probability 0 is never drawn (its cumulative mass does not rise)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generators: list | None = None
) -> torch.Tensor:
    """The next token of each row. With one generator per row: the Gumbel-max draw of `rollout.SeededSampling`
    (argmax of the warped scores plus Gumbel noise from the row's own stream), so a row's tokens do not depend on
    the other rows of the batch."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if generators is not None:
        V = scores.shape[1]
        u = torch.stack([torch.rand(V, generator=g, device=scores.device) for g in generators])
        return (scores - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(dim=-1)
    return draw(torch.softmax(scores, dim=-1))


def distinct_prompts(prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct prompts, each row's prompt index, the first row of each prompt): the G rows of a group share it."""
    uniq, group = torch.unique(prompt_ids, dim=0, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long, device=prompt_ids.device)
    first.scatter_(0, group, torch.arange(len(prompt_ids), device=prompt_ids.device))
    return uniq, group, first


def prefill(dec: StaticKVDecoder, uniq, group, first, prompt_mask, max_new_tokens: int):
    """Run each distinct prompt once and copy its cache to its rows. Returns the rows' next-token logits, the rotary
    position of their first new token and the additive key mask (N, 1, 1, P + max_new_tokens) of decoding."""
    N, P = prompt_mask.shape
    device, dtype = prompt_mask.device, dec.embed.dtype
    neg = torch.finfo(dtype).min
    # prompt positions skip left padding, as in `generate`; generated tokens continue from the last prompt token
    pos = prompt_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(prompt_mask == 0, 1)
    key_ok = torch.ones(N, P + max_new_tokens, dtype=torch.bool, device=device)
    key_ok[:, :P] = prompt_mask.bool()
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    prefill_ok = causal & key_ok[first, None, :P]
    prefill_ok |= torch.eye(P, dtype=torch.bool, device=device)  # a padding query attends to itself (unused, no NaN)
    mask = torch.zeros(len(uniq), 1, P, P, dtype=dtype, device=device).masked_fill(~prefill_ok.unsqueeze(1), neg)
    key_mask = torch.zeros(N, 1, 1, P + max_new_tokens, dtype=dtype, device=device).masked_fill(
        ~key_ok[:, None, None, :], neg
    )
    hidden = dec.forward(uniq, pos[first], 0, dec.grouped(mask, P))
    logits = dec.logits(hidden[:, -1])[group]
    dec.keep(group, P)
    return logits, pos[:, -1:] + 1, key_mask


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: int | list[int],
    pad_token_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    compact: bool = True,
    row_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Completion tokens (N, T) for left-padded prompts (N, P); T = steps run (≤ max_new_tokens), as `generate`
    returns them. After a row's EOS its entries are junk: mask them with `completion_mask_from_eos`.
    A row ends on any of eos_token_ids. row_seeds: one seed per row, each row sampled from its own stream (see
    `next_tokens`)."""
    N, P = prompt_ids.shape
    device = prompt_ids.device
    gens = None if row_seeds is None else [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    eos = torch.as_tensor(eos_token_ids, device=device)
    uniq, group, first = distinct_prompts(prompt_ids)
    dec = StaticKVDecoder(model, len(uniq), P + max_new_tokens)
    logits, next_pos, key_mask = prefill(dec, uniq, group, first, prompt_mask, max_new_tokens)
    out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    rows = torch.arange(N, device=device)  # original row of each live batch slot
    done = torch.zeros(N, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        live_gens = None if gens is None else [gens[r] for r in rows.tolist()]
        tok = next_tokens(logits, do_sample, temperature, top_p, live_gens)
        out[rows, t] = tok
        steps = t + 1
        done |= torch.isin(tok, eos)
        n_done = int(done.sum())
        if n_done == len(rows) or steps == max_new_tokens:
            break
        if compact and n_done * COMPACT_FRACTION >= len(rows):  # finished rows leave the batch
            live = (~done).nonzero().squeeze(1)
            dec.keep(live, P + t)
            rows, tok, next_pos, key_mask = rows[live], tok[live], next_pos[live], key_mask[live]
            done = done[live]
        hidden = dec.forward(tok.unsqueeze(1), next_pos, P + t, dec.grouped(key_mask[..., : P + t + 1], 1))
        next_pos = next_pos + 1
        logits = dec.logits(hidden[:, -1])
    return out[:, :steps]
