"""The one SFT loop, shared by every SFT stage (cold start, general, distillation) and by base-model pretraining.

Loss on response tokens only. Batches are length-grouped (padding-aware): examples are sorted by length inside
shuffled mega-batches, so a batch holds similar lengths and little padding. Everything around the loss is
grpo.training's, shared with GRPO: the optimiser (plain torch on one process, DeepSpeed ZeRO-2/3 on many), the
non-finite guard, checkpoints (atomic, exact resume), fault points and the metric logger.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

# torch and grpo's engine are imported inside functions: recipes import this module (SFTConfig) and must load fast
from grpo.config import LoRAConfig
from stages.core import console
from stages.core.config_base import MAX_SEED, MAX_TOKENS, Strict

log = logging.getLogger(__name__)


class SFTConfig(Strict):
    epochs: float = Field(1.0, gt=0, description="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimiser steps; overrides epochs")
    batch_size: int = Field(32, ge=1, description="examples per optimiser step (global, over all ranks)")
    learning_rate: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_length: int = Field(256, ge=8, le=MAX_TOKENS, description="tokens of prompt + completion; longer completions are cut")
    group_by_length: bool = Field(True, description="batch similar lengths together (less padding); off = random")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints (None: only at the end)")
    log_every: int = Field(10, ge=1)
    time_limit_seconds: float | None = Field(None, gt=0, description="safety cap; stopping early is logged")
    max_bad_steps: int = Field(3, ge=1, description="steps in a row with a NaN/inf loss or gradient (skipped) before "
                               "the run stops")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16: weights in bf16; fp16: fp32 weights, autocast(fp16) forward, loss scaling; "
        "DeepSpeed's bf16/fp16 sections follow it")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward (less memory)")
    micro_batch_size: int | None = Field(None, ge=1, description="examples per forward/backward on each rank; a "
                                         "step's batch is accumulated over micro-batches. None = the whole batch")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="train LoRA adapters only (grpo.lora)")

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if problems := self.world_problems(1):
            raise ValueError("; ".join(problems))
        return self

    def world_problems(self, world: int, where: str = "") -> list[str]:
        """What keeps the batch from splitting over `world` ranks and each rank's share into whole micro-batches."""
        if self.batch_size % world:
            return [(f"batch_size: {self.batch_size} is not divisible by the {world} processes{where}; every rank "
                    "takes an equal share")]
        per_rank = self.batch_size // world
        if self.micro_batch_size is not None and per_rank % self.micro_batch_size:
            return [(f"micro_batch_size: {self.micro_batch_size} does not divide the {per_rank} examples of a batch "
                    f"per rank{where} (batch_size {self.batch_size} / {world} processes)")]
        return []


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    seconds: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list, repr=False)


def tokenize_examples(tokenizer, examples: Sequence[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per example; `completion` gets the eos token. An example whose prompt alone fills
    max_length has nothing to learn from and is an error naming it."""
    out = []
    eos = tokenizer.eos_token_id
    for i, ex in enumerate(examples):
        prompt, completion = _prompt_completion(tokenizer, ex, i)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        if len(p) >= max_length:
            raise ValueError(f"example {i}: prompt is {len(p)} tokens, max_length is {max_length}; raise max_length")
        out.append(((p + c)[:max_length], len(p)))
    return out


def _prompt_completion(tokenizer, ex: dict, i: int) -> tuple[str, str]:
    """An example is {prompt, completion} (already templated), or {messages} (chat template; the last turn is the
    assistant's and the one trained on)."""
    if "messages" in ex:
        msgs = ex["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"example {i}: the last message must be the assistant's")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, " " + msgs[-1]["content"]
    if "prompt" not in ex or "completion" not in ex:
        raise ValueError(f"example {i} needs 'prompt' and 'completion' (or 'messages'); it has {sorted(ex)}")
    return ex["prompt"], ex["completion"]


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, group: bool = True) -> list[list[int]]:
    """Batches of indices with similar lengths: shuffle, sort within mega-batches of 32 batches, shuffle the batches.
    With group=False the batches are plain random ones (better when length correlates with content)."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * 32 if group else batch_size
    batches = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s : s + mega], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    batches = [b for b in batches if len(b) == batch_size] or batches  # drop ragged tails when there is enough data
    rng.shuffle(batches)
    return batches


def collate(batch: Sequence[tuple[list[int], int]], pad_id: int):
    """Right-padded ids, labels with -100 on the prompt and on padding, attention mask."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, start) in enumerate(batch):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        labels[i, start : len(ids)] = t[start:]
        attn[i, : len(ids)] = 1
    return input_ids, labels, attn


def response_nll(model, input_ids, attention_mask, labels):
    """Σ −log p(label) over the label tokens (labels are -100 elsewhere): the LM head and log-softmax run only on the
    positions that predict a label, over chunks of at most CHECKPOINT_ABOVE logits under checkpointing
    (grpo.logprobs.chosen_token_logprobs), never on the (B, L, V) fp32 logits a Hugging Face forward's loss keeps
    (1.2 GB per 2k-token row at Qwen2.5's 152k vocabulary)."""
    from grpo.logprobs import CHECKPOINT_ABOVE, chosen_token_logprobs  # lazy: imports torch

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or model.config.vocab_size  # not weight.shape: ZeRO-3 partitions it
    logp, _ = chosen_token_logprobs(hidden[:, :-1][keep].unsqueeze(0), head, targets[keep].unsqueeze(0),
                                    chunk_size=max(1, CHECKPOINT_ABOVE // vocab), with_entropy=False)
    return -logp.sum()


class SFTTrainer:
    def __init__(self, model, tokenizer, examples: Sequence[dict], cfg: SFTConfig, *, output_dir: str | Path | None = None,
                 logger=None, deepspeed_config: dict | None = None, progress: bool = True, desc: str = "sft"):
        import torch

        from grpo.distributed import rank_and_world  # lazy: imports torch
        from grpo.training import Training  # lazy: imports torch

        if not examples:
            raise ValueError("SFT needs at least one example")
        self.cfg, self.tokenizer, self.progress, self.desc = cfg, tokenizer, progress, desc
        self.rank, self.world = rank_and_world()
        if problems := cfg.world_problems(self.world):
            raise ValueError("; ".join(problems))
        self.data = tokenize_examples(tokenizer, examples, cfg.max_length)
        self.batch_size = min(cfg.batch_size, len(self.data) - len(self.data) % self.world or self.world)
        self.batches_per_epoch = max(1, len(self.data) // self.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch))
        torch.manual_seed(cfg.seed)
        per_rank = self.batch_size // self.world
        self.training = Training(model, cfg, self.total_steps, loop="SFT", output_dir=output_dir, logger=logger,
                                 deepspeed_config=deepspeed_config,
                                 advice="Lower the learning rate, look for broken examples, or raise sft.max_bad_steps.",
                                 accumulation=math.ceil(per_rank / (cfg.micro_batch_size or per_rank)))
        self.engine, self.output_dir = self.training.engine, self.training.output_dir
        self.step = 0
        self._order_epoch, self._order = None, []

    def _batch(self, step: int) -> list[tuple[list[int], int]]:
        """The examples of global step `step` for this rank: a pure function of the step (exact resume)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        if self._order_epoch != epoch:  # one order per epoch, a pure function of (seed, epoch)
            lengths = [len(ids) for ids, _ in self.data]
            self._order = length_grouped_order(lengths, self.batch_size, self.cfg.seed + epoch, self.cfg.group_by_length)
            self._order_epoch = epoch
        order = self._order
        idx = order[pos % len(order)]
        share = len(idx) // self.world
        return [self.data[i] for i in idx[self.rank * share : (self.rank + 1) * share]]

    def train(self, resume_from: str | Path | None = None) -> SFTResult:
        if resume_from == "latest":
            resume_from = self.training.latest()
        if resume_from:
            state = self.training.resume(resume_from)
            self.check_batches(resume_from, state)
            self.step = state["step"]
            log.info("resumed SFT from %s at step %d", resume_from, self.step)
        model = self.engine.module
        model.train()
        start, ema, history, stopped = time.perf_counter(), None, [], False
        bar = console.progress(self.total_steps, self.desc, self.progress and self.rank == 0, initial=self.step)
        while self.step < self.total_steps:
            if self.cfg.time_limit_seconds and time.perf_counter() - start > self.cfg.time_limit_seconds:
                log.warning("SFT hit its %.0f s time limit at step %d of %d", self.cfg.time_limit_seconds, self.step,
                            self.total_steps)
                stopped = True
                break
            t0 = time.perf_counter()
            input_ids, labels, attn = collate(self._batch(self.step), self.tokenizer.pad_token_id)
            self.training.start_step()
            lr = self.engine.lr()
            loss_value = self._backward(model, input_ids, labels, attn)
            grad_norm = self.engine.step()
            self.step += 1
            self.training.end_step()
            if not self.engine.last_skipped:  # a skipped step's loss is NaN/inf: keep it out of the average
                ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value
            metrics = {"sft/loss": loss_value, "sft/lr": lr, "sft/grad_norm": grad_norm,
                       "sft/tokens": float((labels != -100).sum()), "sft/step_seconds": time.perf_counter() - t0,
                       "sft/skipped_steps": float(self.engine.skipped_steps)}
            history.append(metrics)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self.training.log_metrics(metrics, step=self.step)
            bar.set_postfix(loss=f"{ema:.3f}" if ema is not None else "nan", lr=f"{lr:.2g}")
            bar.update(1)
            if self.output_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save()
            self.training.stop_if_non_finite(self.step, self.save)
            self.training.stop_if_preempted(self.step, self.save)
            self.training.fault_point(self.step)
        bar.close()
        model.eval()
        return SFTResult(self.step, float(ema or 0.0), time.perf_counter() - start, stopped, history)

    def _backward(self, model, input_ids, labels, attn) -> float:
        """Backpropagate the batch's loss, the mean over the label tokens of the whole batch on any number of ranks, in
        micro-batches of micro_batch_size rows; returns that loss as a float. Each micro-batch's loss is its token sum
        divided by the batch's token count (on N ranks: the mean count per rank, DeepSpeed averaging the gradients
        over ranks), so the micro-batches' gradients add up to the whole batch's, and N ranks take the step one
        process takes on the whole batch."""
        from grpo.distributed import mean_over_ranks  # lazy: imports torch

        dev = next(model.parameters()).device
        inputs = [input_ids.to(dev), attn.to(dev), labels.to(dev)]
        tokens = (labels[:, 1:] != -100).sum().float().to(dev)
        tokens = mean_over_ranks(tokens) if self.world > 1 else tokens
        micro = self.cfg.micro_batch_size or len(input_ids)
        total = 0.0
        for start in range(0, len(input_ids), micro):
            with self.training.autocast():
                loss = response_nll(model, *(x[start : start + micro] for x in inputs)) / tokens
            self.engine.backward(loss)
            total = total + loss.detach()
        return (mean_over_ranks(total) if self.world > 1 else total).item()

    def save_model(self, directory: str | Path) -> None:
        """The model as a `save_pretrained` directory (safetensors) with its tokenizer; ZeRO-3 shards are gathered
        (every rank calls this), rank 0 writes."""
        state = self.engine.full_state_dict()
        if self.rank == 0:
            self.engine.module.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)

    def save(self) -> Path | None:
        return self.training.save(self.output_dir / f"checkpoint-{self.step}",
                                  {"step": self.step, "batch_size": self.batch_size})

    def check_batches(self, path, state: dict) -> None:
        """The data order is a function of (seed, step, batch size): a checkpoint resumed at another world size that
        changes the batch (fewer examples than batch_size) would not continue it, and is refused."""
        saved = state.get("batch_size", self.batch_size)
        if saved != self.batch_size:
            raise ValueError(
                f"checkpoint {path} was written with batches of {saved} examples and this run takes {self.batch_size} "
                f"({len(self.data)} examples, sft.batch_size {self.cfg.batch_size}, {self.world} rank(s)): the data "
                f"order would not continue; resume with the world size that wrote it ({state.get('world_size')} "
                "rank(s)) or give more examples than sft.batch_size")
