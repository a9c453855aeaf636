"""vLLM as the rollout backend, colocated with the trainer (TRL's "colocate" mode): every rank runs its own vLLM engine
on its own GPU, in its own process, and generates its share of the step's prompts there.

Weights: vLLM loads the architecture and the first weights from the policy's directory; afterwards, before the first
rollout that follows an optimiser update, the policy's parameters (a LoRA policy's merged weights) are streamed into
vLLM's model with its `load_weights` (Hugging Face names in; vLLM fuses q/k/v and gate/up itself). Under ZeRO-3 each
parameter is gathered on its own, copied into vLLM and released, so no rank holds a second full copy of the training
weights.

Imported only when `GRPOConfig.rollout_backend == "vllm"`; vLLM comes with the `gpu` extra (`pip install -e '.[gpu]'`).
Written against vLLM's V1 engine (0.10 and later): `LLM(..., distributed_executor_backend="external_launcher")` keeps
the engine in this process, `LLM.generate` takes token-id prompts and one SamplingParams per request.

Sampler log-probs: each request asks for its sampled tokens' log-probs (`SamplingParams(logprobs=0)`: the chosen token
only), with the engine's `logprobs_mode="processed_logprobs"` (after temperature and top-p, the distribution the tokens
were drawn from; vLLM's default, raw, is before temperature), for the trainer's truncated importance sampling.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from grpo.config import VLLMConfig
from grpo.distributed import rank_and_world
from grpo.lora import has_adapter, merged_weights
from grpo.rollout import (
    HFGenerateBackend,
    Rollout,
    SamplingParams,
    check_tokenizer,
    completion_seed,
    eos_token_ids,
    rollout_from_token_rows,
)


class VLLMNotInstalledError(ImportError):
    """rollout_backend "vllm" was chosen where vLLM is not installed."""


INSTALL_HINT = (
    "rollout_backend='vllm' needs vLLM, which is not installed here: install the `gpu` extra on a CUDA machine "
    "(pip install -e '.[gpu]'), or set grpo.rollout_backend: hf"
)


def check_vllm_installed() -> None:
    """Raise VLLMNotInstalledError (naming the `gpu` extra) when vLLM cannot be imported; cheap, imports nothing."""
    if "vllm" in sys.modules:
        return
    if importlib.util.find_spec("vllm") is None:
        raise VLLMNotInstalledError(INSTALL_HINT)


def full_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every parameter. ZeRO-3 shards are gathered one parameter at a time (a collective:
    every rank iterates in the same order) and released when the consumer asks for the next one."""
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        else:
            yield name, param.data


def policy_weights(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What vLLM's model is fed: every parameter, or for a LoRA policy the merged weights under the plain names
    (vLLM serves the base architecture; the policy itself is not merged)."""
    named = full_parameters(module)
    return merged_weights(module, named) if has_adapter(module) else named


def _weight_loader(llm) -> Callable[[list[tuple[str, torch.Tensor]]], None]:
    """A function that loads (name, tensor) pairs into the model inside an in-process vLLM engine."""
    try:  # the path TRL's colocate mode uses (vLLM 0.10 .. current, engine in this process)
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        return model.load_weights
    except AttributeError:
        pass
    if hasattr(llm, "apply_model"):  # newer vLLM: run a function on the model of each (here: this) worker
        return lambda weights: llm.apply_model(lambda model: model.load_weights(weights))
    raise RuntimeError("cannot reach the model inside this vLLM engine to load weights into it "
                       f"(vllm {getattr(sys.modules.get('vllm'), '__version__', '?')}); is it running in-process?")


def _saved_generation(path: str):
    """A stand-in for a model: the saved generation config of `path` (its EOS ids), or none."""
    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


def _ensure_dist_env() -> None:
    """vLLM's external launcher reads the torch.distributed variables (one process without torchrun has none), and its
    engine must run in this process (V1 would otherwise start an engine-core process we could not load weights into)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def stop_token(output, eos_ids: list[int]) -> int | None:
    """The EOS id a vLLM completion output ended on (finish_reason "stop": its stop_reason when that is a token id,
    else the first EOS id), or None when it ran into max_tokens."""
    if output.finish_reason != "stop":
        return None
    reason = getattr(output, "stop_reason", None)
    return reason if isinstance(reason, int) and reason in eos_ids else eos_ids[0]


def sampled_logprobs(output) -> list[float]:
    """The sampler's log-prob of each token of a vLLM completion output (`logprobs`: one {token id: Logprob} per
    generated token); NaN where the engine reported none."""
    per_token = list(getattr(output, "logprobs", None) or [])
    ids = list(output.token_ids)
    per_token += [None] * (len(ids) - len(per_token))
    return [lp[t].logprob if lp and t in lp else math.nan for t, lp in zip(ids, per_token)]


def rollout_from_token_ids(tokenizer, prompts: list[str], num_generations: int, prompt_ids: torch.Tensor,
                           prompt_mask: torch.Tensor, completions: list[list[int]], stopped_on: list[int | None],
                           eos_ids: list[int] | None = None, logprobs: list[list[float]] | None = None) -> Rollout:
    """A Rollout from per-request completion token ids (N = len(prompts) * G, grouped by prompt).

    prompt_ids / prompt_mask: the prompts left-padded, one row per prompt. A row ends at its first EOS (any of
    eos_ids, default the tokenizer's), as on the other backends, whatever the engine's finish reason (an EOS drawn as
    the last allowed token is still an ending). stopped_on[k]: the EOS id request k stopped on (`stop_token`), appended
    only if the engine left it out of the ids; None: it hit max_tokens, nothing is appended and, without an EOS in its
    ids, the row is truncated. logprobs[k]: the sampler's log-prob of each of request k's ids, cut like the ids (NaN
    for an appended EOS), become `Rollout.sampler_logp`.
    """
    eos_ids = eos_ids or [tokenizer.eos_token_id]
    if len(completions) != len(prompts) * num_generations or len(stopped_on) != len(completions):
        raise ValueError(f"need {len(prompts)} x {num_generations} completions, got {len(completions)}")
    rows, truncated, logp_rows = [], [], []
    for i, (ids, stop) in enumerate(zip(completions, stopped_on)):
        ids = list(ids)
        lps = list(logprobs[i]) if logprobs is not None else []
        end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
        if end is not None:
            ids, lps = ids[: end + 1], lps[: end + 1]
        elif stop is not None:
            ids.append(stop)
            lps.append(math.nan)
        rows.append(ids)
        logp_rows.append(lps)
        truncated.append(end is None and stop is None)
    rollout = rollout_from_token_rows(tokenizer, prompts, prompt_ids, prompt_mask, rows, truncated, num_generations)
    if logprobs is not None:
        rollout.sampler_logp = torch.full(rollout.completion_ids.shape, math.nan)
        for i, lps in enumerate(logp_rows):
            rollout.sampler_logp[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return rollout


class VLLMBackend:
    """vLLM on this rank's GPU, fed the policy's weights whenever `weights_version()` changed since the last sync.
    Without a policy (bulk generation from a saved model) the engine keeps the weights it loaded from `model_path`."""

    def __init__(self, policy: torch.nn.Module | None, tokenizer, config: VLLMConfig | None = None, *,
                 max_prompt_length: int, max_completion_length: int, seed: int = 0, model_path: str | None = None,
                 weights_version: Callable[[], int] | None = None, tensor_parallel_size: int = 1):
        """policy: the trained model (its `name_or_path` directory gives vLLM the architecture, unless `model_path`);
        weights_version: a counter that changes when the policy's weights do (the trainer's step);
        tensor_parallel_size: consecutive ranks that hold one engine and send it the same requests."""
        check_vllm_installed()
        check_tokenizer(tokenizer)
        import vllm

        self.vllm, self.policy, self.tokenizer = vllm, policy, tokenizer
        self.config = config or VLLMConfig()
        self.max_prompt_length = max_prompt_length
        path = model_path or getattr(policy, "name_or_path", "")
        if not path or not Path(path).is_dir():
            raise ValueError(f"vLLM needs the policy's model directory (policy.name_or_path={path!r} is not one): load "
                             "the policy with from_pretrained(<dir>) or pass model_path")
        if policy is None and self.config.sleep:
            raise ValueError("vllm.sleep needs a policy to reload the weights from after each rollout")
        self.eos_ids = eos_token_ids(policy if policy is not None else _saved_generation(path), tokenizer)
        self.weights_version = weights_version or (lambda: 0)
        self.synced_version: int | None = None  # nothing synced yet: the first rollout syncs
        rank, world = rank_and_world()
        if world % tensor_parallel_size:
            raise ValueError(f"{world} ranks do not split into tensor-parallel groups of {tensor_parallel_size}")
        _ensure_dist_env()
        kwargs = {
            "model": str(path),
            "skip_tokenizer_init": True,  # prompts go in as token ids, completions come back as token ids
            "dtype": self.config.dtype,
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "max_model_len": max_prompt_length + max_completion_length,
            "enable_sleep_mode": self.config.sleep,
            "enforce_eager": self.config.enforce_eager,
            "seed": seed + rank // tensor_parallel_size,  # unseeded requests: one stream per engine
            "distributed_executor_backend": "external_launcher",  # this process's engine, on this rank's GPU
            "logprobs_mode": "processed_logprobs",  # sampled tokens' log-probs after temperature, as the trainer's
        }
        if tensor_parallel_size > 1:  # vLLM's torchrun layout: ranks [dp][tp], one engine per tp group
            kwargs |= {"tensor_parallel_size": tensor_parallel_size, "data_parallel_size": world // tensor_parallel_size}
        if self.config.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.config.max_num_seqs
        self.llm = vllm.LLM(**kwargs)
        self._load_weights = _weight_loader(self.llm)
        self._weights_released = False
        if self.config.sleep:  # give the memory back to training until the first rollout
            self.llm.sleep(level=2)
            self._weights_released = True

    # ---- weights
    def sync_weights(self) -> None:
        """Copy the policy's current weights into vLLM (every rank calls it: gathers are collective under ZeRO-3)."""
        if self.config.sleep and self._weights_released:
            self.llm.wake_up(tags=["weights"])
        for name, tensor in policy_weights(self.policy):
            self._load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._weights_released = False
        self.synced_version = self.weights_version()

    def _sync_if_stale(self) -> None:
        if self.policy is None:  # bulk generation: the weights loaded from model_path are the ones to sample
            return
        if self._weights_released or self.synced_version != self.weights_version():
            self.sync_weights()

    # ---- rollouts
    def sampling_params(self, sampling: SamplingParams, seed: int | None):
        return self.vllm.SamplingParams(
            n=1,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop_token_ids=self.eos_ids,
            detokenize=False,
            logprobs=0,  # the sampled token's log-prob only (for truncated importance sampling)
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], num_generations: int, sampling: SamplingParams,
                 seeds: list[int] | None = None) -> Rollout:
        """G requests per prompt (one SamplingParams each, seeded `completion_seed(seeds[i], j)` when seeds are
        given), generated by this rank's engine."""
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1 (got {num_generations})")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        prompt_ids, prompt_mask = HFGenerateBackend(None, self.tokenizer, self.max_prompt_length).tokenize_prompts(
            prompts)
        token_lists = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        requests, params = [], []
        for i, ids in enumerate(token_lists):
            for j in range(num_generations):
                requests.append({"prompt_token_ids": ids})
                params.append(self.sampling_params(sampling, None if seeds is None else completion_seed(seeds[i], j)))
        self._sync_if_stale()
        if self.config.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        finally:
            if self.config.sleep:
                self.llm.sleep(level=2)  # weights are released too: the next rollout loads them again
                self._weights_released = True
        completions = [list(o.outputs[0].token_ids) for o in outputs]
        stopped_on = [stop_token(o.outputs[0], self.eos_ids) for o in outputs]
        logprobs = [sampled_logprobs(o.outputs[0]) for o in outputs]
        return rollout_from_token_ids(self.tokenizer, prompts, num_generations, prompt_ids, prompt_mask, completions,
                                      stopped_on, self.eos_ids, logprobs)
