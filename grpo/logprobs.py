"""Log-probabilities of the chosen completion tokens, and per-token entropy, in one pass.

Only completion positions are projected onto the vocabulary (hidden states are sliced before the LM head), and the
projection + log-softmax runs over chunks of positions, each under activation checkpointing: peak memory holds one chunk
of vocabulary logits, never the whole batch's. Logits are divided by the sampling temperature, so that the ratio and
the KL are measured on the distribution that was sampled.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as Hugging Face `generate` computes them (so training sees what sampling saw)."""
    pos = attention_mask.long().cumsum(dim=-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _chosen_logp_and_entropy(hidden: torch.Tensor, lm_head, tokens: torch.Tensor, temperature: float):
    logits = lm_head(hidden).float() / temperature  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():  # entropy is a diagnostic: H = logsumexp − Σ p·logit
        probs = torch.softmax(logits.detach(), dim=-1)
        entropy = lse.detach() - (probs * logits.detach()).sum(dim=-1)
    return chosen, entropy


def chosen_token_logprobs(
    hidden: torch.Tensor, lm_head, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(lm_head(h)/T)[token] and entropy for (N, T, H) hidden states that predict (N, T) tokens."""
    N, T, H = hidden.shape
    flat_h, flat_tok = hidden.reshape(N * T, H), tokens.reshape(N * T)
    logps, ents = [], []
    for start in range(0, N * T, chunk_size):
        h, tok = flat_h[start : start + chunk_size], flat_tok[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_chosen_logp_and_entropy, h, lm_head, tok, temperature, use_reentrant=False)
        else:
            lp, ent = _chosen_logp_and_entropy(h, lm_head, tok, temperature)
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
