"""The GRPO training loop (DeepSeekMath §4.1, Algorithm 1), once, for every RL stage.

    for iteration:                                   reference ← copy of policy   (only when β > 0)
        for step:
            B prompts → G completions each           (rollout backend)
            rewards = Σ_f weight_f · reward_f        (reward functions passed in; grpo never imports rewards/)
            Â = group (outcome) or per-step (process) advantages
            for μ inner updates: minimise the clipped surrogate + β·KL on the same rollout

Old log-probs are computed once per rollout, and only when the rollout feeds more than one optimiser update (μ > 1 or
several minibatches); otherwise old = new.detach() (ratio 1, the gradient of the plain policy gradient).
One code path for 1 or N ranks: prompts are sharded across ranks, each rank keeps its groups whole.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grpo.advantages import group_advantages, process_advantages
from grpo.config import GRPOConfig
from grpo.distributed import (
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    all_reduce_weighted_mean,
    mean_over_ranks,
    rank_and_world,
)
from grpo.fast import shared_prompt_logprobs, use_fast_path
from grpo.logging import MetricLogger
from grpo.logprobs import packed_completion_logprobs
from grpo.loss import grpo_loss, masked_mean, sampler_gap_stats, truncated_is_weight
from grpo.rewards_io import (
    RewardFunc,
    call_reward,
    char_offsets_to_token_ends,
    check_reward_funcs,
    is_process_reward,
)
from grpo.rollout import HFGenerateBackend, Rollout, RolloutBackend, SamplingParams, mix_seed
from grpo.training import Training

TOKEN_METRICS = ("kl", "clip_low", "clip_high", "entropy", "sampler/logp_diff_mean", "sampler/is_weight_mean",
                 "sampler/is_truncated_frac")


def pooled_std_metrics(metrics: dict[str, float], n: int) -> dict[str, float]:
    """Each `<x>/std` beside an `<x>/mean` (this rank's unbiased std and mean of its n values) as the std over every
    rank's values: the moments n, Σv = n·mean, Σv² = (n−1)·std² + n·mean² are summed over ranks. Identity on one rank."""
    keys = [k for k in sorted(metrics) if k.endswith("/std") and k[:-4] + "/mean" in metrics]
    if rank_and_world()[1] == 1 or not keys:
        return metrics
    rows = []
    for k in keys:
        mean, std = metrics[k[:-4] + "/mean"], metrics[k]
        rows.append([n, n * mean, (n - 1) * std * std + n * mean * mean])
    total = all_reduce_sum(torch.tensor(rows, dtype=torch.float64))
    out = dict(metrics)
    for k, (N, s, ss) in zip(keys, total.tolist()):
        out[k] = math.sqrt(max(ss - s * s / N, 0.0) / max(N - 1, 1))
    return out


class PromptSampler:
    """Walks the dataset in a seeded random order, epoch after epoch; its whole state is (epoch, position)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.pos == self.n:  # next epoch, new order
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            take = min(k - len(out), self.n - self.pos)
            out += order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class GRPOTrainer:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: GRPOConfig,
        dataset: Sequence[dict],
        reward_funcs: Sequence[RewardFunc],
        *,
        backend: RolloutBackend | None = None,
        logger: MetricLogger | None = None,
        output_dir: str | Path | None = None,
        deepspeed_config: dict | None = None,
        progress: bool = True,
        callbacks: Sequence[Callable] = (),
    ):
        """callbacks: each called as `callback(step, rollout, rewards, advantages)` on rank 0 after every step's
        scoring (step counts from 1; rewards: reward name -> this rank's per-completion values; advantages: (N,), or
        (N, T) per token in process mode), e.g. to log or print sample completions."""
        cfg = self.cfg = config
        check_reward_funcs(reward_funcs, cfg.advantage_mode)
        if not dataset:
            raise ValueError("the dataset is empty")
        missing = [i for i, row in enumerate(dataset[:1000]) if "prompt" not in row]
        if missing:
            raise ValueError(
                f"dataset row {missing[0]} has no 'prompt' column (columns: {sorted(dataset[missing[0]])})"
            )
        self.rank, self.world = rank_and_world()
        if backend is None and cfg.rollout_backend == "vllm":
            from grpo.rollout_vllm import check_vllm_installed  # lazy: only the vLLM backend needs it

            check_vllm_installed()  # before DeepSpeed or vLLM touch the model
        if problems := cfg.world_problems(self.world):
            raise ValueError("; ".join(problems))
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.reward_funcs = list(reward_funcs)
        self.progress = progress
        self.callbacks = list(callbacks)
        self.reward_values: dict[str, list[float]] = {}  # the last step's, per reward function

        # each rank samples its own completions; the weights are the same everywhere (DeepSpeed broadcasts rank 0's)
        random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        self.training = Training(
            model, cfg, self.total_updates, loop="GRPO", output_dir=output_dir, logger=logger,
            deepspeed_config=deepspeed_config, keep_checkpoints=cfg.keep_checkpoints,
            advice="Lower the learning rate, look for extreme rewards or data, or raise grpo.max_bad_steps.",
            accumulation=self.local_minibatch // (cfg.micro_batch_size or self.local_minibatch),
        )
        self.engine = self.training.engine
        self.output_dir = self.training.output_dir
        self.backend = backend or self.default_backend()
        self.sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_completion_length, do_sample=True)
        self.sampler = PromptSampler(len(dataset), cfg.seed)
        self.reference: torch.nn.Module | None = None
        self.global_step = 0

    # ---- sizes
    @property
    def local_prompts(self) -> int:
        return self.cfg.prompts_per_step // self.world

    @property
    def minibatches_per_rollout(self) -> int:
        cfg = self.cfg
        return 1 if cfg.minibatch_size is None else cfg.prompts_per_step * cfg.num_generations // cfg.minibatch_size

    @property
    def total_updates(self) -> int:
        return self.cfg.total_steps * self.cfg.mu * self.minibatches_per_rollout

    # ---- the loop
    def train(self, resume_from: str | Path | None = None, max_steps: int | None = None) -> list[dict]:
        """Run until `config.total_steps` (or `max_steps` more steps); returns the per-step metrics of this call.

        resume_from: a checkpoint directory, or "latest" for the newest one in output_dir.
        """
        cfg = self.cfg
        if resume_from is not None:
            self.resume(resume_from)
        stop = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.global_step + max_steps)
        if self.global_step == 0:
            self.training.log_params({f"grpo.{k}": v for k, v in cfg.model_dump().items()})
        history = []
        bar = tqdm(total=cfg.total_steps, initial=self.global_step, disable=not self.progress or self.rank != 0)
        while self.global_step < stop:
            if self.global_step % cfg.steps_per_iteration == 0 and cfg.beta > 0:
                self.reference = self.engine.make_reference()  # new iteration: π_ref ← π_θ
            self.training.start_step()
            metrics = self.train_step()
            self.global_step += 1
            self.training.end_step()
            metrics["skipped_steps"] = float(self.engine.skipped_steps)  # non-finite updates skipped so far
            history.append(metrics)
            if self.global_step % cfg.log_every == 0 or self.global_step == stop:
                self.training.log_metrics(metrics, step=self.global_step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0.0):.3g}")
            last = self.global_step == cfg.total_steps
            if self.output_dir is not None and (
                last or cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
            ):
                self.save()
            self.training.stop_if_non_finite(self.global_step, self.save)
            self.training.stop_if_preempted(self.global_step, self.save)
            self.training.fault_point(self.global_step)
        bar.close()
        return history

    def train_step(self) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        self.timings = dict.fromkeys(("generate", "rewards", "reference", "forward", "backward"), 0.0)
        rows = self.next_rows()
        rollout = self.backend.generate([r["prompt"] for r in rows], G, self.sampling, **self.rollout_seeds())
        rollout = rollout.to(next(self.engine.module.parameters()).device)
        gen_time = time.perf_counter() - t0
        self.timings["generate"] = gen_time

        t_rewards = time.perf_counter()
        with self.training.python_random():
            rewards, reward_metrics = self.score(rollout, rows)
        self.timings["rewards"] = time.perf_counter() - t_rewards
        if cfg.advantage_mode == "outcome":
            advantages = group_advantages(rewards, G, cfg.scale_rewards)
        else:
            advantages = process_advantages(
                rewards["step_rewards"], rewards["step_ends"], G, rollout.completion_ids.shape[1], cfg.scale_rewards
            )
        advantages = advantages.to(rollout.completion_ids.device)
        for callback in self.callbacks if self.rank == 0 else ():
            callback(self.global_step + 1, rollout, self.reward_values, advantages)
        update_stats = self.policy_update(rollout, advantages)

        lengths = rollout.lengths.float()
        metrics = {
            **reward_metrics,
            **update_stats,
            "completion_length/mean": lengths.mean().item(),
            "truncated_share": rollout.truncated.float().mean().item(),
        }
        # per-token diagnostics are token means over the whole batch: weight each rank by its token count
        per_token = {k: metrics.pop(k) for k in TOKEN_METRICS if k in metrics}
        maxima = {k: metrics.pop(k) for k in ("sampler/logp_diff_max",) if k in metrics}
        metrics = all_reduce_mean(pooled_std_metrics(metrics, len(rollout.completions)))
        metrics.update(all_reduce_weighted_mean(per_token, rollout.completion_mask.sum().item()))
        metrics["completion_length/max"] = all_reduce_max(lengths.max().item())
        metrics.update({k: all_reduce_max(v) for k, v in maxima.items()})
        step_time = time.perf_counter() - t0
        metrics["lr"] = self.engine.lr()
        metrics["step_time"] = step_time
        metrics["tokens_per_s"] = lengths.sum().item() * self.world / max(gen_time, 1e-9)
        # where the step's time went (seconds): sampling, reward functions, frozen log-probs (reference, old policy),
        # the policy's forward + loss, backward + optimiser step
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        return metrics

    def default_backend(self) -> RolloutBackend:
        """The backend `rollout_backend` names: HF generate on the policy itself, or vLLM colocated on this rank's GPU,
        which takes the policy's weights before the first rollout after each step's updates."""
        cfg = self.cfg
        if cfg.rollout_backend == "vllm":
            from grpo.rollout_vllm import VLLMBackend  # lazy: only the vLLM backend needs it

            return VLLMBackend(self.engine.module, self.tokenizer, cfg.vllm, max_prompt_length=cfg.max_prompt_length,
                               max_completion_length=cfg.max_completion_length, seed=cfg.seed,
                               weights_version=lambda: self.global_step)
        return HFGenerateBackend(
            self.engine.module,
            self.tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            synced_gpus=getattr(self.engine, "zero_stage", 0) == 3 and self.world > 1,
        )

    def rollout_seeds(self) -> dict:
        """`seeds=` for the backend with rollout_seeding="prompt": one per prompt of this rank, from (seed, step, the
        prompt's position in the whole step's batch), the same whatever the number of ranks; {} otherwise."""
        if self.cfg.rollout_seeding != "prompt":
            return {}
        first = self.rank * self.local_prompts
        return {"seeds": [mix_seed(self.cfg.seed, self.global_step, first + i) for i in range(self.local_prompts)]}

    def next_rows(self) -> list[dict]:
        """This rank's share of the step's B prompts (every rank draws the same global indices)."""
        idx = self.sampler.take(self.cfg.prompts_per_step)
        mine = idx[self.rank * self.local_prompts : (self.rank + 1) * self.local_prompts]
        return [self.dataset[i] for i in mine]

    # ---- rewards
    def reward_columns(self, rows: list[dict]) -> dict[str, list]:
        """Every dataset column but the prompt, one entry per completion (each row repeated G times)."""
        G = self.cfg.num_generations
        return {k: [row[k] for row in rows for _ in range(G)] for k in rows[0] if k != "prompt"}

    def score(self, rollout: Rollout, rows: list[dict]):
        return (self.score_outcome if self.cfg.advantage_mode == "outcome" else self.score_process)(rollout, rows)

    def score_outcome(self, rollout: Rollout, rows: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """r_i = Σ_f weight_f · reward_f(completion_i), shape (N,), and per-function metrics."""
        columns, metrics = self.reward_columns(rows), {}
        total = torch.zeros(len(rollout.completions))
        for name, fn, weight in self.reward_funcs:
            values = call_reward(name, fn, rollout.prompts, rollout.completions, **columns)
            self.reward_values[name] = [float(v) for v in values]
            r = torch.tensor(values, dtype=torch.float32)
            total += weight * r
            metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = r.mean().item(), r.std().item()
            if name == "accuracy":
                metrics["accuracy"] = r.mean().item()
        metrics["reward/mean"], metrics["reward/std"] = total.mean().item(), total.std().item()
        groups = total.view(-1, self.cfg.num_generations)
        metrics["zero_std_groups"] = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()
        return total, metrics

    def score_process(self, rollout: Rollout, rows: list[dict]) -> tuple[dict, dict[str, float]]:
        """Per completion, the steps of all reward functions (weighted, summed where they end at the same character;
        an outcome reward is one step ending the completion), with each step's end mapped from a character offset to a
        token index."""
        columns, metrics = self.reward_columns(rows), {}
        merged: list[dict[int, float]] = [{} for _ in rollout.completions]  # char offset -> weighted step reward
        for name, fn, weight in self.reward_funcs:
            out = call_reward(name, fn, rollout.prompts, rollout.completions, **columns)
            if not is_process_reward(fn):
                out = [[(len(c), r)] for c, r in zip(rollout.completions, out)]
            sums = torch.tensor([sum(r for _, r in steps) for steps in out], dtype=torch.float32)
            self.reward_values[name] = sums.tolist()
            metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = sums.mean().item(), sums.std().item()
            for i, steps in enumerate(out):
                for off, r in steps:
                    merged[i][off] = merged[i].get(off, 0.0) + weight * r
        step_rewards, step_ends = [], []
        for i, steps in enumerate(merged):
            offsets = sorted(steps)
            step_rewards.append([steps[o] for o in offsets])
            length = int(rollout.lengths[i])
            ends = char_offsets_to_token_ends(self.tokenizer, rollout.completion_ids[i], length, offsets)
            if ends:  # decoded text has no EOS: the last step also covers it (and trailing whitespace), to learn stopping
                ends[-1] = max(ends[-1], length - 1)
            step_ends.append(ends)
        totals = torch.tensor([sum(s) for s in step_rewards], dtype=torch.float32)
        metrics["reward/mean"], metrics["reward/std"] = totals.mean().item(), totals.std().item()
        return {"step_rewards": step_rewards, "step_ends": step_ends}, metrics

    # ---- μ inner updates on one rollout
    def logprobs(self, model, rollout: Rollout, rows: slice | torch.Tensor, with_entropy: bool = True):
        """(logp, entropy) of the completion tokens of `rows`, (n, T); 0 after each row's last completion token.
        Padding is not computed: the fast path's shared-prompt pass where it supports the model, else the model's
        own forward in length buckets (grpo.logprobs.packed_completion_logprobs). fp16 (fp32 weights under autocast)
        takes the reference path: the fast path runs in its weights' dtype."""
        off = "precision fp16 (fp32 weights under autocast)" if self.cfg.precision == "fp16" else None
        packed = shared_prompt_logprobs if use_fast_path(model, off) else packed_completion_logprobs
        with self.training.autocast():
            return packed(
                model,
                rollout.prompt_ids[rows],
                rollout.prompt_mask[rows],
                rollout.completion_ids[rows],
                rollout.completion_mask[rows],
                self.cfg.temperature,
                self.cfg.logprob_chunk_size,
                with_entropy=with_entropy,
            )

    @torch.no_grad()
    def frozen_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """Log-probs under a model that does not change during the updates (old policy, reference), by minibatch."""
        t0 = time.perf_counter()
        n, mb = rollout.completion_ids.shape[0], self.local_minibatch
        out = torch.cat([self.logprobs(model, rollout, slice(s, s + mb), False)[0] for s in range(0, n, mb)])
        self.add_time("reference", t0)
        return out

    def add_time(self, key: str, since: float) -> None:
        timings = getattr(self, "timings", None)
        if timings is not None:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - since

    @property
    def local_minibatch(self) -> int:
        n = self.local_prompts * self.cfg.num_generations
        return n // self.minibatches_per_rollout

    def policy_update(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """μ passes over the rollout, one optimiser update per minibatch; returns the mean of each diagnostic.

        π_old is the policy that sampled the rollout: frozen log-probs when several updates reuse the rollout,
        otherwise the detached current ones (the same numbers, without a second forward pass).

        Micro-batches: a minibatch of M rows is run as micro-batches of m rows (micro_batch_size), each backward
        adding its share, one optimiser step per minibatch. Each micro-batch's loss L_k is scaled so that Σ_k of the
        scaled losses is the minibatch's loss L, hence the same gradient:
          sequence_mean  L = (1/M) Σ_i ℓ_i, with ℓ_i a sequence's token mean; grpo_loss gives L_k = (1/m) Σ_{i∈k} ℓ_i,
                         so the share is (m/M) L_k = (1/M) Σ_{i∈k} ℓ_i.
          token_mean     L = Σ_tokens / num_tokens; num_tokens is the minibatch's token count (mean over ranks, as
                         without micro-batches), so L_k = Σ_{tokens∈k} / num_tokens is already its share.
          dr_grpo        L = Σ_tokens / (M·max_len); grpo_loss gives Σ_{tokens∈k} / (m·max_len): the share is (m/M) L_k.
        The update's diagnostics are the micro-batches' token-weighted means (the loss: their sum).

        Truncated importance sampling (a rollout with the sampler's log-probs, `cfg.importance_sampling`): each token's
        surrogate is weighted by min(π_old / π_sampler, C), π_old being the same frozen or detached log-probs as in the
        ratio. The gap between the sampler's and π_old's log-probs is logged whenever the sampler reported them.
        """
        cfg = self.cfg
        policy = self.engine.module
        n, mb = rollout.completion_ids.shape[0], self.local_minibatch
        micro = cfg.micro_batch_size or mb
        updates_per_rollout = cfg.mu * self.minibatches_per_rollout
        old_logp = self.frozen_logprobs(policy, rollout) if updates_per_rollout > 1 else None
        sampler_logp, cap = rollout.sampler_logp, cfg.vllm_importance_sampling_cap
        correct = cfg.importance_sampling and sampler_logp is not None
        detached_old: list[torch.Tensor] = []  # π_old = the first pass's detached log-probs, when not frozen
        ref_logp = self.frozen_logprobs(self.reference, rollout) if cfg.beta > 0 else None
        was_training = policy.training
        policy.train(was_training or cfg.gradient_checkpointing)  # Hugging Face checkpoints only in training mode

        stats: dict[str, list[float]] = {}
        for inner in range(cfg.mu):
            for start in range(0, n, mb):
                minibatch_mask = rollout.completion_mask[start : start + mb]
                minibatch_tokens = minibatch_mask.sum().float()
                num_tokens = mean_over_ranks(minibatch_tokens) if cfg.loss_aggregation == "token_mean" else None
                update: dict[str, float] = {}
                for micro_start in range(start, start + mb, micro):
                    rows = slice(micro_start, micro_start + micro)
                    mask = rollout.completion_mask[rows]
                    t_forward = time.perf_counter()
                    logp, entropy = self.logprobs(policy, rollout, rows)
                    old = old_logp[rows] if old_logp is not None else logp.detach()
                    if old_logp is None and sampler_logp is not None and inner == 0:
                        detached_old.append(old)
                    loss, s = grpo_loss(
                        logp,
                        old,
                        advantages[rows],
                        mask,
                        logp_ref=ref_logp[rows] if ref_logp is not None else None,
                        beta=cfg.beta,
                        eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high,
                        kl_estimator=cfg.kl_estimator,
                        aggregation=cfg.loss_aggregation,
                        max_len=cfg.max_completion_length,
                        num_tokens=num_tokens,
                        is_weight=truncated_is_weight(old, sampler_logp[rows], cap) if correct else None,
                    )
                    if micro < mb and cfg.loss_aggregation != "token_mean":
                        loss = loss * (mask.shape[0] / mb)  # this micro-batch's share (see the docstring)
                    self.add_time("forward", t_forward)
                    t_backward = time.perf_counter()
                    self.engine.backward(loss)
                    self.add_time("backward", t_backward)
                    s["loss"] = loss.item()
                    s["entropy"] = masked_mean(entropy, mask).item()
                    weight = 1.0 if micro == mb else (mask.sum() / minibatch_tokens.clamp(min=1)).item()
                    for k, v in s.items():
                        update[k] = update.get(k, 0.0) + (v if k == "loss" else weight * v)
                t_backward = time.perf_counter()
                update["grad_norm"] = self.engine.step()
                self.add_time("backward", t_backward)
                for k, v in update.items():
                    stats.setdefault(k, []).append(v)
        policy.train(was_training)
        self.last_update_stats = stats  # every update's values (the returned dict holds means)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        if sampler_logp is not None:
            old_all = old_logp if old_logp is not None else torch.cat(detached_old)
            out.update(sampler_gap_stats(old_all, sampler_logp, rollout.completion_mask, cap))
        return out

    # ---- outputs
    def save_model(self, directory: str | Path) -> None:
        """The policy as a Hugging Face `save_pretrained` directory (safetensors) with its tokenizer; rank 0 writes."""
        state = self.engine.full_state_dict()  # collective under ZeRO-3
        if self.rank == 0:
            self.engine.module.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)

    # ---- checkpoints
    def trainer_state(self) -> dict:
        return {"global_step": self.global_step, "sampler": self.sampler.state(), "world_size": self.world}

    def save(self, path: str | Path | None = None) -> Path | None:
        """A checkpoint (at `path`, default output_dir/checkpoint-<step>); None when the weights are not finite."""
        if path is None:
            if self.output_dir is None:
                raise ValueError("save() needs a path or the trainer's output_dir")
            path = self.output_dir / f"checkpoint-{self.global_step}"
        return self.training.save(path, self.trainer_state(), self.reference)

    def resume(self, path: str | Path) -> None:
        if str(path) == "latest":
            if (found := self.training.latest()) is None:
                raise FileNotFoundError(f"no complete checkpoint under output_dir={self.output_dir}")
            path = found
        if self.cfg.beta > 0 and self.reference is None:
            self.reference = self.engine.make_reference()  # overwritten by the saved weights
        state = self.training.resume(path, self.reference)  # another world size: resharded, the data order continues
        self.global_step = state["global_step"]
        self.sampler.load(state["sampler"])
