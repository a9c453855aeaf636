"""Rollouts: prompts in, G sampled completions per prompt out, as padded tensors plus decoded text.

A backend is anything with `generate(prompts, num_generations, sampling) -> Rollout`. `HFGenerateBackend` samples
from a Hugging Face model: with the fast path's `grpo.fast.sample` (static KV cache, finished rows leave the batch) for
Qwen2/Llama models, with Hugging Face `generate` and its KV cache otherwise (`grpo.fast.use_fast_path` decides); `grpo.rollout_vllm.VLLMBackend` runs vLLM on the GPU.

Seeded completions: given `seeds=` (one int per prompt), completion j of prompt i is drawn from its own random stream
`completion_seed(seeds[i], j)`, so a completion does not depend on which batch or rank it was generated in. The trainer
passes them with `rollout_seeding="prompt"`: then N ranks sample what one process samples.

Layout: prompt i's completions are rows i*G .. i*G+G-1 (one group per prompt, consecutive). Prompts are left-padded,
completions right-padded; `completion_mask` covers the tokens up to and including the first EOS. Every backend ends a
completion on any of `eos_token_ids` (the tokenizer's EOS and every EOS id of the model's generation config).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch

from grpo import fast


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    do_sample: bool = True  # False: greedy decoding (temperature and top_p are ignored)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (got {self.temperature}); use do_sample=False")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


@dataclass
class Rollout:
    """One batch of generations. N = num_prompts * num_generations rows."""

    prompts: list[str]  # the N prompt texts (each prompt repeated G times, consecutively)
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, T) right-padded with pad_token_id after the first EOS
    completion_mask: torch.Tensor  # (N, T) 1 on tokens up to and including the first EOS
    completions: list[str]  # decoded with skip_special_tokens=True (<think>/<answer> survive: they are not special)
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    lengths: torch.Tensor  # (N,) number of completion tokens (EOS included)
    num_generations: int
    # (N, T) the sampler's log-prob of each completion token, NaN where unknown (an EOS appended because the engine left
    # it out, padding); None from backends that report none (HF generate, the fast decoder)
    sampler_logp: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """(N, P+T) prompt and completion, the sequence the policy scores."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def to(self, device) -> Rollout:
        moved = {
            f.name: (
                getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }
        return Rollout(**moved)


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompts: list[str], num_generations: int, sampling: SamplingParams) -> Rollout: ...


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a hash, so neighbouring inputs give unrelated streams)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def completion_seed(prompt_seed: int, j: int) -> int:
    """The seed of completion j of a prompt seeded `prompt_seed`."""
    return mix_seed(prompt_seed, j)


class SeededSampling:
    """A logits processor that turns greedy decoding into sampling with one random stream per row: temperature and
    top-p as Hugging Face's sampling path applies them, then Gumbel noise from the row's own generator; the argmax of
    that is a draw from softmax(logits / T) restricted to the nucleus (the Gumbel-max trick)."""

    def __init__(self, row_seeds: list[int], temperature: float, top_p: float, device):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        V = scores.shape[1]
        u = torch.stack([torch.rand(V, generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u.clamp_min(1e-20)))


def check_tokenizer(tokenizer) -> None:
    """Generation and padding need both an EOS (to stop) and a PAD (to pad); fail clearly instead of mid-batch."""
    missing = [name for name in ("eos_token_id", "pad_token_id") if getattr(tokenizer, name, None) is None]
    if missing:
        raise ValueError(
            f"tokenizer has no {' and no '.join(m.removesuffix('_id') for m in missing)}; "
            "GRPO needs an EOS token to end completions and a PAD token to pad batches"
        )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, then each EOS id of the model's generation config
    (an int or a list: chat models often stop on two)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [configured] if isinstance(configured, int) else list(configured or []):
        if i not in ids:
            ids.append(i)
    return ids


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: int | list[int]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated): mask is 1 up to and including the first EOS (any of eos_token_ids) of each row; truncated
    rows have no EOS."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_token_ids, device=completion_ids.device))
    T = completion_ids.shape[1]
    positions = torch.arange(T, device=completion_ids.device).expand_as(completion_ids)
    first_eos = torch.where(
        is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], T, dtype=torch.long)
    )
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, ~is_eos.any(dim=1)


class HFGenerateBackend:
    """Hugging Face `generate` (KV cache, left padding, per-sequence stop at EOS)."""

    def __init__(self, model, tokenizer, max_prompt_length: int | None = None, synced_gpus: bool = False,
                 fast_decoding: bool = True):
        """synced_gpus: keep every rank stepping until all are done (needed under ZeRO-3, where each forward is collective).
        fast_decoding: sample with `grpo.fast.sample` (static KV cache, finished rows dropped) where it supports the
        model; False, or an unsupported model, or synced_gpus: Hugging Face `generate`."""
        check_tokenizer(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.synced_gpus = synced_gpus
        self.fast_decoding = fast_decoding

    def uses_fast_decoding(self) -> bool:
        off = None
        if not self.fast_decoding:
            off = "fast_decoding=False"
        elif self.synced_gpus:
            off = "synced_gpus (ZeRO-3 over several ranks: every rank steps generate together)"
        return fast.use_fast_path(self.model, off)

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
        if self.max_prompt_length is not None:
            lengths = enc["attention_mask"].sum(dim=1)
            too_long = (lengths > self.max_prompt_length).nonzero().flatten().tolist()
            if too_long:
                i = too_long[0]
                raise ValueError(
                    f"prompt {i} is {int(lengths[i])} tokens long, over max_prompt_length={self.max_prompt_length} "
                    f"({len(too_long)} prompt(s) too long; first starts {prompts[i][:80]!r})"
                )
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def generate(self, prompts: list[str], num_generations: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> Rollout:
        """seeds: one per prompt; completion j of prompt i is then sampled from `completion_seed(seeds[i], j)`."""
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1 (got {num_generations})")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = self.tokenize_prompts(prompts)
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0).to(device)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0).to(device)

        row_seeds = [completion_seed(s, j) for s in seeds for j in range(num_generations)] if seeds is not None else None
        eos = eos_token_ids(model, tok)
        was_training = model.training
        model.eval()
        try:
            if self.uses_fast_decoding():
                completion_ids = fast.sample(
                    model, prompt_ids, prompt_mask, sampling.max_new_tokens, eos, tok.pad_token_id,
                    do_sample=sampling.do_sample, temperature=sampling.temperature, top_p=sampling.top_p,
                    row_seeds=row_seeds,
                )
            else:
                completion_ids = self.hf_generate(prompt_ids, prompt_mask, sampling, row_seeds, eos)
        finally:
            model.train(was_training)

        completion_mask, truncated = completion_mask_from_eos(completion_ids, eos)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(
            prompts=[p for p in prompts for _ in range(num_generations)],
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            completions=texts,
            truncated=truncated,
            lengths=completion_mask.sum(dim=1),
            num_generations=num_generations,
        )

    def hf_generate(self, prompt_ids, prompt_mask, sampling: SamplingParams, row_seeds: list[int] | None,
                    eos: list[int]):
        """Completion ids (N, T) from Hugging Face `generate`; T = steps run."""
        device, model = prompt_ids.device, self.model
        config = generation_config(sampling, eos, self.tokenizer.pad_token_id, row_seeds is not None)
        processors = None
        if sampling.do_sample and row_seeds is not None:  # greedy over Gumbel-perturbed logits = seeded sampling
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([SeededSampling(row_seeds, sampling.temperature, sampling.top_p, device)])
        # generate fills every field a passed config leaves unset from model.generation_config (repetition penalty,
        # no_repeat_ngram_size, suppressed tokens...): while it runs, the model's own config is ours
        saved, model.generation_config = model.generation_config, config
        try:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                 logits_processor=processors, synced_gpus=self.synced_gpus)
        finally:
            model.generation_config = saved
        return out[:, prompt_ids.shape[1] :]


def generation_config(sampling: SamplingParams, eos: list[int], pad: int, seeded: bool = False):
    """A GenerationConfig of our sampling parameters and nothing else, so that `generate` samples from the
    distribution whose log-probs are trained: softmax(logits / T), nucleus top_p, no top-k, no penalties.
    seeded: greedy decoding, the sampling being done by a SeededSampling processor."""
    from transformers import GenerationConfig

    kw = {"do_sample": sampling.do_sample and not seeded, "max_new_tokens": sampling.max_new_tokens,
          "eos_token_id": eos, "pad_token_id": pad, "use_cache": True}
    if kw["do_sample"]:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    return GenerationConfig(**kw)


def rollout_from_completions(
    tokenizer, prompts: list[str], completions: list[str], num_generations: int, max_prompt_length: int | None = None
) -> Rollout:
    """A Rollout for given completion texts (each followed by EOS): for scoring fixed samples, tests, offline data.

    `completions` holds num_generations texts per prompt, grouped consecutively like a generated rollout.
    """
    check_tokenizer(tokenizer)
    if len(completions) != len(prompts) * num_generations:
        raise ValueError(f"need {len(prompts)} x {num_generations} completions, got {len(completions)}")
    prompt_ids, prompt_mask = HFGenerateBackend(None, tokenizer, max_prompt_length).tokenize_prompts(prompts)
    eos = tokenizer.eos_token_id
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
    rows = [r[: r.index(eos) + 1] for r in rows]  # the mask ends at the first EOS
    return rollout_from_token_rows(tokenizer, prompts, prompt_ids, prompt_mask, rows, [False] * len(rows),
                                   num_generations)


def rollout_from_token_rows(tokenizer, prompts: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            rows: list[list[int]], truncated: list[bool], num_generations: int) -> Rollout:
    """A Rollout from completion token ids, one row per completion (N = len(prompts) * G, grouped by prompt), each
    row ending with its EOS unless truncated; prompt_ids / prompt_mask hold each prompt once, left-padded."""
    width = max(1, max(len(r) for r in rows))
    completion_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    return Rollout(
        prompts=[p for p in prompts for _ in range(num_generations)],
        prompt_ids=prompt_ids.repeat_interleave(num_generations, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids,
        completion_mask=(torch.arange(width) < lengths.unsqueeze(1)).long(),  # up to and including the EOS
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        lengths=lengths,
        num_generations=num_generations,
    )
