"""Rejection sampling (R1 §2.3.3): sample k completions per prompt from a model, keep only the clean ones.

Shared by `synthesize` (reasoning data from the RL checkpoint) and `cold_start_sft` (readable CoT from R1-Zero).
A sample is kept only if it passes every enabled filter:

- `incorrect`: the final answer is wrong (accuracy reward < 1);
- `mixed_language`: the CoT is not all in the target language (language consistency < 1; no CoT at all scores 0);
- `bad_format`: not exactly `<think>…</think><answer>…</answer>` (strict format reward < 1);
- `too_long`: over `max_completion_tokens` tokens, or cut off at `max_new_tokens` (no EOS);
- `duplicate`: the same normalised completion as one already kept for the same prompt.

Rejection counts are per filter and overlap (a sample can fail several), so a caller can say why a target was missed.
Generation batch `b` is seeded from (seed, b), so a batch's samples do not depend on which batches ran before it, nor
on which rank generates it: a resumed run regenerates exactly what an uninterrupted one would have, and N ranks
(stages.core.sharding) sample what one does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from rewards import accuracy_reward, format_reward, language_consistency_reward
from stages.core.heldout import problem_prompts
from stages.core.models import check_model_dir, load_model, load_tokenizer, pick_device, resolve_model_uri
from stages.core.recipe import PromptConfig
from stages.core.tasks import Problem

log = logging.getLogger(__name__)

FILTERS = ("incorrect", "mixed_language", "bad_format", "too_long", "duplicate")


@dataclass(frozen=True)
class Filters:
    require_correct: bool = True
    require_language: bool = True
    require_format: bool = True
    max_completion_tokens: int | None = None  # None: only truncated samples are too long
    dedupe: bool = True


@dataclass
class Counts:
    """What happened to the samples so far: generated, kept, rejected per filter (overlapping)."""

    prompts: int = 0
    generated: int = 0
    passed: int = 0  # passed every filter (some may be beyond the target and not kept)
    rejected: int = 0  # failed at least one filter
    by_filter: Counter = field(default_factory=Counter)

    def add(self, other: Counts) -> None:
        self.prompts += other.prompts
        self.generated += other.generated
        self.passed += other.passed
        self.rejected += other.rejected
        self.by_filter.update(other.by_filter)

    @property
    def acceptance_rate(self) -> float:
        return self.passed / self.generated if self.generated else 0.0

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}prompts": self.prompts, f"{prefix}generated": self.generated, f"{prefix}passed": self.passed,
               f"{prefix}rejected": self.rejected, f"{prefix}acceptance_rate": self.acceptance_rate}
        out |= {f"{prefix}rejected_{name}": self.by_filter.get(name, 0) for name in FILTERS}
        return {k: float(v) for k, v in out.items()}

    def why(self) -> str:
        """One line: the numbers behind a missed target."""
        parts = ", ".join(f"{name}={self.by_filter.get(name, 0)}" for name in FILTERS)
        return (f"{self.generated} samples from {self.prompts} prompts, {self.passed} passed "
                f"({self.acceptance_rate:.1%}); rejected per filter (overlapping): {parts}")

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "generated": self.generated, "passed": self.passed,
                "rejected": self.rejected, "by_filter": dict(self.by_filter)}

    @classmethod
    def from_json(cls, d: dict) -> Counts:
        return cls(d["prompts"], d["generated"], d["passed"], d["rejected"], Counter(d["by_filter"]))

    def to_vector(self) -> list[float]:
        """The counts as numbers in a fixed order (for an all-reduce over ranks)."""
        return [self.prompts, self.generated, self.passed, self.rejected] + [self.by_filter.get(f, 0) for f in FILTERS]

    @classmethod
    def from_vector(cls, v: Sequence[float]) -> Counts:
        n = [round(x) for x in v]
        return cls(*n[:4], Counter({f: c for f, c in zip(FILTERS, n[4:]) if c}))


def normalize_completion(text: str) -> str:
    """What counts as the same completion: case and whitespace do not."""
    return " ".join(text.split()).lower()


def score(candidates: Sequence[dict], target_language: str) -> list[dict]:
    """Add `accuracy`, `format` and `language` scores to candidate rows (prompt, completion, answer, task, metadata,
    question)."""
    prompts = [c["prompt"] for c in candidates]
    texts = [c["completion"] for c in candidates]
    cols = {k: [c.get(k) for c in candidates] for k in ("answer", "task", "metadata", "question")}
    acc = accuracy_reward(prompts, texts, **cols)
    fmt = format_reward(prompts, texts, **cols)
    lang = language_consistency_reward(prompts, texts, target_language=target_language, **cols)
    return [{**c, "accuracy": a, "format": f, "language": g} for c, a, f, g in zip(candidates, acc, fmt, lang)]


def apply_filters(scored: Sequence[dict], filters: Filters, seen: set | None = None) -> tuple[list[dict], Counts]:
    """The candidates that pass every enabled filter, in order, and the counts. `seen` holds (prompt_id, normalised
    completion) pairs already kept (updated in place), for duplicates across calls."""
    seen = set() if seen is None else seen
    counts = Counts(generated=len(scored))
    kept = []
    for c in scored:
        failed = []
        if filters.require_correct and c["accuracy"] < 1.0:
            failed.append("incorrect")
        if filters.require_language and c["language"] < 1.0:
            failed.append("mixed_language")
        if filters.require_format and c["format"] < 1.0:
            failed.append("bad_format")
        limit = filters.max_completion_tokens
        if c["truncated"] or (limit is not None and c["length"] > limit):
            failed.append("too_long")
        key = (c["prompt_id"], normalize_completion(c["completion"]))
        if not failed and filters.dedupe and key in seen:
            failed.append("duplicate")
        if failed:
            counts.rejected += 1
            counts.by_filter.update(failed)
            continue
        seen.add(key)
        counts.passed += 1
        kept.append(c)
    return kept, counts


def to_row(c: dict, source_run: str) -> dict:
    """The kept sample as a data row, with its provenance."""
    return {"prompt": c["prompt"], "completion": c["completion"], "question": c["question"], "answer": c["answer"],
            "task": c.get("task") or "", "metadata": c.get("metadata") or "{}", "kind": "reasoning",
            "source_run": source_run, "prompt_id": c["prompt_id"], "sample_index": int(c["sample_index"]),
            "reward": float(c["accuracy"]), "length": int(c["length"])}


class RejectionSampler:
    """k samples per prompt from a rollout backend, in batches of `batch_prompts` prompts, scored and filtered.

    `sample_batch(b)` is a pure function of (model, problems, b, seed): the unit a resumable caller (and each rank of a
    data-parallel one, stages.core.sharding) works in. Prompts are built as GRPO builds them (`prompt`'s template, or
    its system turn through the model's chat template). The Hugging Face backend draws batch b from the global torch
    stream seeded (seed, b); a backend given `seeds=` (vLLM: `seeded_completions`) draws each completion from its own
    seed, a hash of (seed, prompt index, j).
    """

    def __init__(self, backend, problems: Sequence[Problem], *, source_run: str, prompt: PromptConfig,
                 samples_per_prompt: int, temperature: float, max_new_tokens: int, filters: Filters,
                 batch_prompts: int, seed: int = 0, prompt_prefix: str = "r", seeded_completions: bool = False):
        from grpo.rollout import SamplingParams  # lazy: imports torch

        self.backend, self.seeded_completions = backend, seeded_completions
        self.problems = list(problems)
        self.prompt, self.target_language = prompt, prompt.target_language
        self.source_run = source_run
        self.k, self.filters, self.batch_prompts, self.seed = samples_per_prompt, filters, batch_prompts, seed
        self.sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, do_sample=True)
        self.prefix = prompt_prefix

    @property
    def tokenizer(self):  # the backend's: a data-parallel caller sets the backend only on ranks that generate
        return getattr(self.backend, "tokenizer", None)

    @property
    def num_batches(self) -> int:
        return -(-len(self.problems) // self.batch_prompts)

    def candidates(self, b: int) -> list[dict]:
        """The raw samples of batch b (seeded from (seed, b)), with lengths and truncation."""
        import torch

        from grpo.rollout import mix_seed  # lazy: imports torch

        lo = b * self.batch_prompts
        probs = self.problems[lo : lo + self.batch_prompts]
        prompts = problem_prompts(probs, self.prompt, self.tokenizer)
        if self.seeded_completions:
            seeds = [mix_seed(self.seed, lo + i) for i in range(len(probs))]
            r = self.backend.generate(prompts, self.k, self.sampling, seeds=seeds)
        else:
            torch.manual_seed(self.seed * 1_000_003 + b)
            r = self.backend.generate(prompts, self.k, self.sampling)
        out = []
        for j, text in enumerate(r.completions):
            i, s = divmod(j, self.k)
            p = probs[i]
            truncated = bool(r.truncated[j])
            out.append({"prompt": prompts[i], "completion": text, "question": p.question, "answer": p.answer,
                        "task": p.task, "metadata": p.metadata, "prompt_id": f"{self.prefix}{lo + i}",
                        "sample_index": s, "truncated": truncated,
                        "length": int(r.lengths[j]) - (0 if truncated else 1)})  # tokens of text, EOS not counted
        return out

    def sample_batch(self, b: int) -> tuple[list[dict], Counts]:
        """Rows kept from batch b and its counts. Prompts never span batches, so duplicates are found per batch."""
        kept, counts = apply_filters(score(self.candidates(b), self.target_language), self.filters)
        counts.prompts = len(self.problems[b * self.batch_prompts : (b + 1) * self.batch_prompts])
        return [to_row(c, self.source_run) for c in kept], counts


def load_backend(model_uri: str, cfg, recipe):
    """The rollout backend a rejection sampler generates with (`cfg`: a stage's BulkGeneration settings): Hugging Face
    generate on this rank's device, or vLLM's offline engine reading the model's directory (no weights in torch)."""
    path = check_model_dir(resolve_model_uri(model_uri))
    trust = recipe.base_model.trust_remote_code
    if cfg.rollout_backend == "vllm":
        from transformers import AutoConfig

        from grpo.rollout_vllm import VLLMBackend  # lazy: imports torch

        context = AutoConfig.from_pretrained(path, trust_remote_code=trust).max_position_embeddings
        return VLLMBackend(None, load_tokenizer(path, trust), cfg.vllm, max_prompt_length=context - cfg.max_new_tokens,
                           max_completion_length=cfg.max_new_tokens, seed=recipe.seed, model_path=str(path),
                           tensor_parallel_size=cfg.vllm_tensor_parallel_size)
    from grpo.rollout import HFGenerateBackend  # lazy: imports torch

    return HFGenerateBackend(load_model(path, pick_device(recipe.device), trust), load_tokenizer(path, trust))

