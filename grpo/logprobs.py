"""Log-probabilities of the chosen completion tokens, and per-token entropy, in one pass.

Only completion positions are projected onto the vocabulary (hidden states are sliced before the LM head), and the
projection + log-softmax runs over chunks of positions. When the batch's vocabulary logits would be large (over
CHECKPOINT_ABOVE elements, 64 MB in fp32), each chunk runs under activation checkpointing: peak memory then holds one
chunk of logits, never the whole batch's; below that, recomputing them in the backward pass would only cost time.
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
from torch.utils.checkpoint import checkpoint


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
