"""GRPOConfig: every knob of the engine, typed and validated before any model loads.

Defaults follow the DeepSeekMath / R1 seed (k3 KL with beta > 0, symmetric clip, token-level mean over a sequence),
not TRL's defaults. A bad value fails naming its field.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

log = logging.getLogger(__name__)
_warned_top_p = False


class VLLMConfig(BaseModel):
    """vLLM colocated with the trainer: one engine per rank on that rank's GPU, weights synced from the policy."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="share of the GPU vLLM takes (weights + KV cache); training keeps the rest"
    )
    sleep: bool = Field(
        False, description="release vLLM's GPU memory between rollouts (sleep mode: KV cache and weights freed; the "
        "weights come back from the policy at the next rollout)"
    )
    dtype: str = Field("auto", description="vLLM's weight dtype (auto: the model's; bfloat16 on GPUs)")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences per vLLM batch (None: vLLM's default)")
    enforce_eager: bool = Field(False, description="no CUDA graphs (faster start, slower decoding)")


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAConfig(BaseModel):
    """LoRA adapters (peft) on the policy: only the adapters train, the base weights stay frozen (grpo.lora)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    enabled: bool = Field(False, description="train LoRA adapters instead of every weight")
    rank: int = Field(16, ge=1, description="r: the rank of each adapter's A (r x in) and B (out x r)")
    alpha: float = Field(32.0, gt=0, description="the adapter's output is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while the model is in "
                           "training mode (SFT; in GRPO it would make the ratio and the KL noisy: keep 0 there)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1,
        description="names of the Linear layers that get an adapter (a module whose name ends with one); default: "
        "the attention and MLP projections of Llama/Qwen models",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if blank := [name for name in v if not name.strip()]:
            raise ValueError(f"target_modules holds an empty name ({blank[0]!r}); list module names like 'q_proj'")
        return v

    def deepspeed_problems(self, ds_config: dict | None) -> list[str]:
        """What keeps these adapters from training under a DeepSpeed config: ZeRO-3 partitions the base weights, which
        the LoRA reference shares with the policy and the merged export reads whole (grpo.lora)."""
        if self.enabled and (ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3:
            return [("lora.enabled with DeepSpeed ZeRO-3 (zero_optimization.stage 3) is not supported: use ZeRO-2 "
                    "(infra/deepspeed/zero2.json; a frozen base is small next to full fine-tuning's optimizer state), "
                    "or full fine-tuning under ZeRO-3")]
        return []


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    # --- schedule: iterations x steps x mu
    prompts_per_step: int = Field(16, ge=1, description="B: prompts sampled per step (across all ranks)")
    num_generations: int = Field(8, ge=1, description="G: completions per prompt (one group)")
    iterations: int = Field(1, ge=1, description="outer iterations; the reference model is reset to the policy at each")
    steps_per_iteration: int = Field(100, ge=1, description="rollout steps per iteration")
    mu: int = Field(1, description="inner policy updates per rollout batch (mu = 1: old log-probs = detached new ones)")
    minibatch_size: int | None = Field(
        None, ge=1, description="completions per optimiser update; None = the whole rollout batch (B*G) per update"
    )

    # --- loss
    epsilon: float = Field(0.2, description="clip range: ratio clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, description="upper clip (DAPO clip-higher); None = epsilon")
    beta: float = Field(0.04, description="KL coefficient; 0 = no reference model is held or run")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="estimator of KL(pi_new || pi_ref) per token")
    loss_aggregation: Literal["token_mean", "sequence_mean", "dr_grpo"] = Field(
        "sequence_mean",
        description="sequence_mean: mean over a sequence's tokens, then over sequences (GRPO paper); token_mean: over "
        "all tokens of the batch, across ranks too (DAPO); dr_grpo: sum over tokens / (sequences * max_completion_length) (Dr. GRPO)",
    )
    advantage_mode: Literal["outcome", "process"] = Field(
        "outcome", description="outcome: one reward per completion; process: rewards per reasoning step"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="divide centred rewards by the group's std, the whole batch's std, or not at all (Dr. GRPO)",
    )

    # --- generation
    temperature: float = Field(1.0, gt=0, description="sampling temperature (also applied to the log-probs)")
    top_p: float = Field(
        1.0, gt=0, le=1,
        description="nucleus sampling. Below 1 completions are drawn from the truncated distribution, while the "
        "ratio and the KL use the untruncated log-probs: the rollout is then slightly off-policy (warned once)",
    )
    max_prompt_length: int = Field(256, ge=1, description="longer prompts are an error, not silently cut")
    max_completion_length: int = Field(256, ge=1, description="max new tokens; also the dr_grpo normaliser")
    rollout_backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: Hugging Face generate (CPU or GPU); vllm: vLLM on each rank's GPU (`pip install .[gpu]`)"
    )
    rollout_seeding: Literal["rank", "prompt"] = Field(
        "rank",
        description="rank: each rank samples from its own random stream; prompt: each completion from a seed of "
        "(seed, step, prompt position, g), so the rollouts, and the run, do not depend on the number of ranks",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="settings of the vllm rollout backend")
    vllm_importance_sampling: bool | None = Field(
        None, description="truncated importance sampling: weight each token's policy-gradient loss (not the KL) by "
        "min(pi_old / pi_vllm, vllm_importance_sampling_cap), correcting for vLLM's log-probs differing from the "
        "trainer's. None: on with rollout_backend vllm, as in TRL; true with another backend is refused",
    )
    vllm_importance_sampling_cap: float = Field(
        2.0, gt=1, description="C, the cap of the importance weight (TRL's default)"
    )

    # --- optimiser
    learning_rate: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup, in optimiser updates")
    lr_schedule: Literal["cosine", "constant"] = Field("constant", description="after warmup")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None = no clipping")

    # --- bookkeeping
    seed: int = 0
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between checkpoints; None = only at the end (the last step is always saved)"
    )
    keep_checkpoints: int | None = Field(2, ge=1, description="newest checkpoints kept in output_dir; None = all")
    log_every: int = Field(1, ge=1, description="steps between metric logs")
    max_bad_steps: int = Field(
        3, ge=1, description="steps in a row with a NaN/inf loss or gradient (updates skipped) before the run stops"
    )
    logprob_chunk_size: int = Field(
        4096, ge=1, description="positions per chunk of the log-softmax (bounds peak memory of the vocab projection)"
    )

    # --- scale: precision, activation memory, micro-batches
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training and generation precision: bf16 casts the weights to bf16; fp16 keeps fp32 "
        "weights and runs the forward under autocast(fp16) with loss scaling; DeepSpeed's bf16/fp16 sections follow it"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (less memory, more time)"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="completions per forward/backward on each rank; an update's minibatch is accumulated "
        "over micro-batches (same gradient). None = one forward per minibatch"
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="train LoRA adapters only (grpo.lora)")

    @field_validator("mu")
    @classmethod
    def _mu_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"mu (inner updates per rollout) must be >= 1, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _warn_truncated_sampling(cls, v: float) -> float:
        global _warned_top_p
        if v < 1 and not _warned_top_p:
            _warned_top_p = True
            log.warning("grpo.top_p=%s: completions are sampled from the top-p truncated distribution, but the "
                        "training log-probs (ratio, KL) are not truncated, so the samples are slightly off-policy", v)
        return v

    @field_validator("epsilon", "epsilon_high")
    @classmethod
    def _eps_positive(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(f"{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("beta")
    @classmethod
    def _beta_nonneg(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"beta (KL coefficient) must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _group_std_needs_two(self):
        if self.num_generations < 2 and self.scale_rewards != "none":
            raise ValueError(
                f"num_generations={self.num_generations}: a group needs at least 2 completions to have a std "
                f"(scale_rewards={self.scale_rewards!r}); use num_generations >= 2"
            )
        if self.minibatch_size is not None:
            n = self.prompts_per_step * self.num_generations
            if n % self.minibatch_size:
                raise ValueError(
                    f"minibatch_size={self.minibatch_size} must divide prompts_per_step*num_generations={n}"
                )
        if self.vllm_importance_sampling and self.rollout_backend != "vllm":
            raise ValueError(
                f"vllm_importance_sampling: true needs rollout_backend 'vllm' (got {self.rollout_backend!r}): it "
                "corrects for vLLM's log-probs, which no other backend reports; leave it unset or false"
            )
        if problems := self.world_problems(1):  # one process: only micro_batch_size can fail here
            raise ValueError("; ".join(problems))
        return self

    def world_problems(self, world: int, where: str = "") -> list[str]:
        """What keeps this config from splitting evenly over `world` ranks ('field: why' each; empty: it splits). Every
        rank takes prompts_per_step/world prompts and minibatch_size/world completions of each minibatch, so that N
        ranks plan and take the same optimiser updates as one process. `where` names the ranks in the message."""
        out = []
        if self.prompts_per_step % world:
            out.append(f"prompts_per_step: {self.prompts_per_step} is not divisible by the {world} processes{where}; "
                       "every rank takes an equal share")
        if self.minibatch_size is not None and self.minibatch_size % world:
            out.append(f"minibatch_size: {self.minibatch_size} is not divisible by the {world} processes{where}; "
                       f"every rank takes an equal share of each minibatch")
        per_rank = (self.minibatch_size or self.prompts_per_step * self.num_generations) // world
        if self.micro_batch_size is not None and per_rank % self.micro_batch_size:
            out.append(f"micro_batch_size: {self.micro_batch_size} does not divide the {per_rank} completions of a "
                       f"minibatch per rank{where} (minibatch_size or prompts_per_step*num_generations, / {world} "
                       "processes); each update accumulates whole micro-batches")
        return out

    @property
    def importance_sampling(self) -> bool:
        """Whether the truncated importance-sampling correction is on (vllm_importance_sampling, resolved)."""
        if self.vllm_importance_sampling is None:
            return self.rollout_backend == "vllm"
        return self.vllm_importance_sampling

    @property
    def eps_low(self) -> float:
        return self.epsilon

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def total_steps(self) -> int:
        return self.iterations * self.steps_per_iteration
