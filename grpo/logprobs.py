"""Log-probabilities of the chosen completion tokens, and per-token entropy, in one pass.

Only completion positions are projected onto the vocabulary (hidden states are sliced before the LM head), and the
projection + log-softmax runs over chunks of positions. When the batch's vocabulary logits would be large (over
CHECKPOINT_ABOVE elements, 64 MB in fp32), `ChunkedLMHead` computes them one chunk at a time and keeps only each
position's log-normaliser for backward, which recomputes the chunk's logits and turns them into their gradient in
place: peak memory holds about one chunk of fp32 logits, never the whole batch's. Below that, plain autograd
(recomputing would only cost time).
Logits are divided by the sampling temperature, so that the ratio and the KL are measured on the distribution that was
sampled. This module is the reference: the model's own Hugging Face forward, for every model.

`packed_completion_logprobs` is the trainer's path when the fast path does not run: a rollout is left-padded prompts
then right-padded completions, so a batch padded to the longest prompt and the longest completion spends a third of its
positions on padding. It moves each row's tokens to the start of the row (plain causal attention, positions from 0, the
same numbers as the padded layout), sorts rows by length into a few buckets each cut to its own longest row, and
projects only the positions that predict a real completion token. For Llama-family models the trainer uses the fast
path's `grpo.fast.shared_prompt_logprobs`, which also computes each prompt once per group instead of once per completion
(`grpo.fast.use_fast_path` decides).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as Hugging Face `generate` computes them (so training sees what sampling saw)."""
    pos = attention_mask.long().cumsum(dim=-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


CHECKPOINT_ABOVE = 2**24  # vocabulary logits (positions x vocab) above which the LM head runs chunked and recomputed
VOCAB_TILE = 32768  # vocabulary columns per elementwise pass (and per GEMM on the CPU) of ChunkedLMHead


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


def lm_head_tile(weight: torch.Tensor) -> int:
    """Vocabulary rows per tile of ChunkedLMHead. On the CPU, VOCAB_TILE: a chunk's logits live one (n, 32k) tile at
    a time, and each tile of the head is cast to fp32 for the gradient GEMMs (a tile's fp32 copy, not the whole
    head's). Elsewhere the whole vocabulary in one GEMM, as autograd runs it: bf16 GEMMs over tiles would round each
    tile's share of the hidden states' gradient before the sum."""
    return VOCAB_TILE if weight.device.type == "cpu" else weight.shape[0]


def tile_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v: int, tile: int,
                temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """(n, tile) fp32 logits / T over vocabulary rows v..v+tile of hidden states h (n, H), projected in `dtype` as the
    model's forward would (its weights' dtype, or autocast's)."""
    b = None if bias is None else bias[v : v + tile].to(dtype)
    return F.linear(h.to(dtype), weight[v : v + tile].to(dtype), b).float().div_(temperature)


def in_tile(tokens: torch.Tensor, v: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each token in the tile starting at vocabulary row v, clamped into it; whether it is really there)."""
    local = tokens - v
    return local.clamp(0, width - 1).unsqueeze(-1), ((local >= 0) & (local < width)).unsqueeze(-1)


class ChunkedLMHead(torch.autograd.Function):
    """log softmax(h W^T + b)/T [token] and the entropy (a diagnostic, no gradient) for hidden states h (n, H), over
    chunks of `chunk_size` positions and tiles of the vocabulary (`lm_head_tile`) with a running log-sum-exp. Forward
    keeps h and each position's log-normaliser, not the logits; backward recomputes each tile's logits and turns them
    in place into d logp / d logits = (onehot - softmax) / T.

    The gradient GEMMs run in fp32 on the CPU, where a bf16 GEMM with the vocabulary as its inner dimension has no
    fast kernel (no AVX512-BF16/AMX: (256 x 151,936) @ (151,936 x 128) took 41 s, 0.3 s in fp32; it was 80% of a
    GRPO step at Qwen's vocabulary, and TRL's chunked head casts to fp32 there too). Elsewhere they run in the
    forward's dtype, as autograd would. Gradients are summed over chunks and tiles in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature: float, chunk_size: int, with_entropy: bool):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        V, tile = weight.shape[0], lm_head_tile(weight)
        logp, entropy = [], []
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h, tok = hidden[s : s + chunk_size], tokens[s : s + chunk_size]
            top = torch.full((len(h), 1), -torch.inf, device=h.device)
            sum_exp, sum_exp_z, chosen = torch.zeros_like(top), torch.zeros_like(top), torch.zeros_like(top)
            for v in range(0, V, tile):
                z = tile_logits(h, weight, bias, v, tile, temperature, dtype)
                col, here = in_tile(tok, v, z.shape[1])
                chosen = torch.where(here, z.gather(-1, col), chosen)
                new_top = torch.maximum(top, z.amax(dim=-1, keepdim=True))
                rescale = (top - new_top).exp()
                e = (z - new_top).exp_()
                sum_exp = sum_exp * rescale + e.sum(dim=-1, keepdim=True)
                if with_entropy:  # H = lse - Σ e·z / Σ e
                    sum_exp_z = sum_exp_z * rescale + e.mul_(z).sum(dim=-1, keepdim=True)
                top = new_top
            lse[s : s + chunk_size] = (top + sum_exp.log()).squeeze(-1)
            logp.append(chosen.squeeze(-1) - lse[s : s + chunk_size])
            if with_entropy:
                entropy.append(lse[s : s + chunk_size] - (sum_exp_z / sum_exp).squeeze(-1))
        logp = torch.cat(logp)
        entropy = torch.cat(entropy) if with_entropy else torch.zeros_like(logp)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.dtype, ctx.temperature, ctx.chunk_size = dtype, temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        T, chunk, V, tile = ctx.temperature, ctx.chunk_size, weight.shape[0], lm_head_tile(weight)
        gemm = torch.float32 if weight.device.type == "cpu" else ctx.dtype
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for v in range(0, V, tile):  # tiles outside, chunks inside: a tile's weight gradient is summed in fp32 alone
            w = weight[v : v + tile].to(gemm)
            tile_w = None  # the first chunk's part as it comes, then an fp32 sum (one chunk: no fp32 copy of a V x H)
            tile_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
            for s in range(0, hidden.shape[0], chunk):
                h, tok = hidden[s : s + chunk], tokens[s : s + chunk]
                g = grad_logp[s : s + chunk].float().unsqueeze(-1) / T
                z = tile_logits(h, weight, bias, v, tile, T, ctx.dtype)
                dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)  # -softmax · g/T, in place
                col, here = in_tile(tok, v, z.shape[1])
                dz = dz.scatter_add_(-1, col, g * here).to(gemm)  # + onehot · g/T
                if need_h:
                    grad_h[s : s + chunk] += dz @ w
                if need_w:
                    part = dz.t() @ h.to(gemm)
                    tile_w = part if tile_w is None else tile_w.float().add_(part)
                if need_b:
                    tile_b += dz.sum(dim=0, dtype=torch.float32)
            if need_w:
                grad_w[v : v + tile] = tile_w
            if need_b:
                grad_b[v : v + tile] = tile_b
        return (None if grad_h is None else grad_h.to(hidden.dtype), grad_w, grad_b, None, None, None, None)


def fused_head_supported(lm_head) -> bool:
    """ChunkedLMHead reads the LM head's weight directly: a plain nn.Linear whose weight is whole (not partitioned
    by ZeRO-3, which gathers it only inside the module's own forward)."""
    return type(lm_head) is torch.nn.Linear and not hasattr(lm_head.weight, "ds_id")


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
    large = N * T * vocab > CHECKPOINT_ABOVE
    if large and fused_head_supported(lm_head):
        logp, ent = ChunkedLMHead.apply(flat_h, lm_head.weight, lm_head.bias, flat_tok, temperature, chunk_size,
                                        with_entropy)
        return logp.view(N, T), ent.view(N, T)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and large
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


def length_buckets(lengths: torch.Tensor, max_buckets: int, min_rows: int = 16) -> list[torch.Tensor]:
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), each (N, T) like `completion_ids`, for left-padded prompts and right-padded completions;
    0 after each row's last completion token (the last 1 of `completion_mask`).

    Same values as `completion_logprobs` on the same rows (up to floating-point summation order), without computing
    padded positions: rows are re-laid out as [prompt, completion, padding] and run in length buckets.
    """
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
    for rows in length_buckets(total, max_buckets):
        w = int(total[rows].max())
        out = model.base_model(input_ids=aligned[rows, :w], use_cache=False)
        k = torch.arange(w, device=device)
        p, c = plen[rows].unsqueeze(1), clen[rows].unsqueeze(1)
        predicts = (k >= p - 1) & (k < p + c - 1)  # hidden state at k predicts the token at k + 1
        hidden.append(out.last_hidden_state[predicts])
        tokens.append(aligned[rows, 1 : w + 1][predicts])
        dest.append((rows.unsqueeze(1) * T + cols)[cols < c])  # same row-major order as `predicts`
    return scatter_logprobs(model, hidden, tokens, dest, (N, T), temperature, chunk_size, with_entropy)


def scatter_logprobs(model, hidden: list[torch.Tensor], tokens: list[torch.Tensor], dest: list[torch.Tensor],
                     shape: tuple[int, int], temperature: float, chunk_size: int, with_entropy: bool):
    """(logp, entropy), each `shape` (N, T), from packed pieces: hidden states (k, H) predicting `tokens` (k,), whose
    flat row-major index in (N, T) is `dest` (k,); 0 where nothing was computed."""
    logp, ent = chosen_token_logprobs(
        torch.cat(hidden).unsqueeze(0), model.get_output_embeddings(), torch.cat(tokens).unsqueeze(0), temperature,
        chunk_size, with_entropy,
    )
    dest = torch.cat(dest)
    zeros = logp.new_zeros(shape[0] * shape[1])
    return zeros.index_put((dest,), logp[0]).view(shape), zeros.index_put((dest,), ent[0]).view(shape)
