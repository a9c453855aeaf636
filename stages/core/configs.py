"""Typed configuration of each R1 stage (a section of the recipe). Defaults are the `tiny` preset's scale."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from grpo.config import GRPOConfig, VLLMConfig
from rewards.registry import RewardSpec
from stages.core.config_base import MAX_GENERATIONS, MAX_TOKENS, ModelArch, Strict, UserPath
from stages.core.sft import SFTConfig


class DataSource(Strict):
    """Where prompts come from: generated here (a task family), a local dataset, or a hub id (where a network exists).

    Local datasets: a `save_to_disk` folder, or a .parquet / .jsonl / .json (a list of rows) / .csv file. `columns`
    maps our names (question, answer, task, metadata; messages or prompt as turns for a conversation; completion,
    chosen, rejected) to the dataset's own column names. Hub ids honour HF_HUB_OFFLINE (the local cache only).
    """

    source: Literal["generated", "path", "hub"] = "generated"
    task: str = Field("addition", description="task family when source=generated (stages.core.tasks)")
    max_digits: int = Field(2, ge=1, le=6)
    path: UserPath | None = Field(None, description="dataset folder/file (source=path) or hub id (source=hub)")
    split: str = Field("train", description="split name for hub datasets")
    columns: dict[str, str] = Field(default_factory=dict, description="our column name -> dataset column name")
    num_prompts: int = Field(2000, ge=1, description="prompts drawn from the source")

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "generated" and not self.path:
            raise ValueError(f"source={self.source} needs a path")
        return self


def _rewards(*names_weights) -> list[RewardSpec]:
    return [RewardSpec(name=n, weight=w) for n, w in names_weights]


class GRPOStageConfig(Strict):
    """A GRPO stage: prompts, the engine's config, rewards by name and weight."""

    data: DataSource = DataSource()
    grpo: GRPOConfig = GRPOConfig(prompts_per_step=16, num_generations=8, steps_per_iteration=60,
                                  max_completion_length=64, max_prompt_length=64, learning_rate=1e-3,
                                  beta=0.04, log_every=5)
    rewards: list[RewardSpec] = Field(default_factory=lambda: _rewards(("accuracy", 1.0), ("format", 0.5)))
    deepspeed_config: UserPath | None = Field(None, description="DeepSpeed JSON (infra/deepspeed/...) for world size > 1")
    samples_to_log: int = Field(64, ge=0, description="completions in each MLflow completions table")
    log_completions_every: int | None = Field(None, ge=1, description="steps between completions tables "
                                              "(completions/step_XXXX.json; default: 4 per run, and the last step)")

    @model_validator(mode="after")
    def _sizes_bounded(self):
        """The engine's config takes any positive size; a stage's must also fit a machine (1e6 generations or a
        1e9-token completion validate, then fail hours later)."""
        g = self.grpo
        if g.num_generations > MAX_GENERATIONS:
            raise ValueError(f"grpo.num_generations={g.num_generations}: at most {MAX_GENERATIONS} completions per "
                             "prompt")
        for field in ("max_prompt_length", "max_completion_length"):
            if getattr(g, field) > MAX_TOKENS:
                raise ValueError(f"grpo.{field}={getattr(g, field)}: at most {MAX_TOKENS} tokens (the model's context "
                                 "is checked at preflight)")
        return self


class R1ZeroConfig(GRPOStageConfig):
    """Pure RL from the base model: accuracy + format rewards, the R1-Zero template."""


class BulkGeneration(Strict):
    """Where rejection sampling generates (synthesis, cold-start sampling): Hugging Face generate, or vLLM's offline
    engine on each rank's GPUs (tensor-parallel over `vllm_tensor_parallel_size` consecutive ranks)."""

    rollout_backend: Literal["hf", "vllm"] = Field("hf", description="hf: Hugging Face generate (CPU or GPU); vllm: "
                                                   "vLLM's LLM.generate (`pip install .[gpu]`)")
    vllm: VLLMConfig = Field(default_factory=lambda: VLLMConfig(gpu_memory_utilization=0.9),
                             description="vLLM engine settings (the engine has the GPU to itself here)")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="GPUs (consecutive ranks) that hold one vLLM engine; "
                                           "the ranks' count must be a multiple of it")

    @model_validator(mode="after")
    def _vllm_only(self):
        if self.rollout_backend != "vllm" and self.vllm_tensor_parallel_size > 1:
            raise ValueError(f"vllm_tensor_parallel_size={self.vllm_tensor_parallel_size} needs rollout_backend: vllm")
        if self.vllm.sleep:
            raise ValueError("vllm.sleep: bulk generation has no trainer to give the GPU back to; set it false")
        return self


class ColdStartConfig(BulkGeneration):
    """SFT of the base model on long, readable CoT: a given dataset, or R1-Zero samples filtered for readability."""

    data: DataSource | None = Field(None, description="a CoT dataset (source path/hub; columns prompt + completion, or "
                                    "question + answer + completion; map others with data.columns); None = build one")
    num_prompts: int = Field(300, ge=1, description="prompts sampled from the R1-Zero model to build the set")
    samples_per_prompt: int = Field(4, ge=1, le=MAX_GENERATIONS)
    target_size: int = Field(400, ge=1, description="examples kept, built or read (thousands in the full recipe)")
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, description="length filter (None: only cut-off samples)")
    batch_prompts: int = Field(64, ge=1, description="prompts per generation batch")
    prompt_data: DataSource | None = Field(None, description="prompts to sample from; None = the r1_zero stage's")
    samples_to_log: int = Field(64, ge=0, description="training examples logged as an MLflow table")
    sft: SFTConfig = SFTConfig(max_steps=60, batch_size=32, learning_rate=5e-4, warmup_steps=5)


class ReasoningRLConfig(GRPOStageConfig):
    """GRPO from the cold-start model with accuracy + format + language consistency."""

    rewards: list[RewardSpec] = Field(default_factory=lambda: _rewards(
        ("accuracy", 1.0), ("format", 0.5), ("language_consistency", 0.5)))


class SynthesizeConfig(BulkGeneration):
    """Rejection sampling from the reasoning-RL model plus general samples: the 800k set (600k + 200k in the paper)."""

    reasoning_target: int = Field(600, ge=0, description="reasoning samples kept")
    general_target: int = Field(200, ge=0, description="general (non-reasoning) samples kept")
    samples_per_prompt: int = Field(4, ge=1, le=MAX_GENERATIONS, description="k completions sampled per reasoning prompt")
    max_prompts: int = Field(1000, ge=1, description="reasoning prompts tried at most (bounds the time of a weak model)")
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int = Field(60, ge=1, description="length filter: longer kept samples are dropped")
    require_correct: bool = True
    require_format: bool = True
    require_language: bool = Field(True, description="drop samples whose CoT mixes languages")
    dedupe: bool = True
    shard_size: int = Field(200, ge=1, description="rows per shard; synthesis resumes from the last finished shard")
    batch_prompts: int = Field(64, ge=1, description="prompts per generation batch")
    data: DataSource = DataSource(num_prompts=2000)
    general_data: DataSource = DataSource(task="general", num_prompts=400)
    samples_to_log: int = Field(64, ge=0, description="rows logged as an MLflow table")


class GeneralSFTConfig(Strict):
    """SFT of the base model on the synthesized set."""

    sft: SFTConfig = SFTConfig(epochs=3, batch_size=32, learning_rate=1e-3, warmup_steps=5)


class RewardModelTraining(Strict):
    """A reward model trained here when none is given: a small Qwen2ForSequenceClassification on the policy's
    tokenizer, Bradley-Terry loss on synthetic preference pairs from the `general` task family."""

    pairs: int = Field(400, ge=8, description="synthetic preference pairs per reward model")
    eval_pairs: int = Field(64, ge=1, description="held-out pairs (eval split) for the logged pairwise accuracy")
    epochs: int = Field(2, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=8, description="tokens of prompt + response read by the reward model")
    model: ModelArch = Field(default_factory=lambda: ModelArch(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        max_position_embeddings=256), description="architecture of a reward model built here (vocab: the policy's)")


class PreferenceRLConfig(GRPOStageConfig):
    """All-scenario RL: rule rewards on reasoning prompts, reward models on general prompts."""

    grpo: GRPOConfig = GRPOConfig(prompts_per_step=16, num_generations=8, steps_per_iteration=30,
                                  max_completion_length=64, max_prompt_length=64, learning_rate=5e-4,
                                  beta=0.04, log_every=5)
    general_data: DataSource = DataSource(task="general", num_prompts=400)
    general_share: float = Field(0.25, ge=0, le=1, description="share of general prompts in the mix")
    helpfulness_model: UserPath | None = Field(None, description="reward model for the final answer; None = train one")
    harmlessness_model: UserPath | None = Field(None, description="reward model for the whole response; None = train one")
    reward_model_training: RewardModelTraining = RewardModelTraining()
    rewards: list[RewardSpec] = Field(default_factory=lambda: _rewards(
        ("accuracy", 1.0), ("format", 0.5), ("language_consistency", 0.5)))
    general_reward_weight: float = Field(1.0, ge=0, description="weight of each reward model's score")
    general_eval_prompts: int = Field(32, ge=1, description="held-out general prompts scored before and after RL")

    @model_validator(mode="after")
    def _outcome_only(self):
        if self.grpo.advantage_mode != "outcome":
            raise ValueError("preference_rl routes one reward per completion by prompt kind: "
                             f"grpo.advantage_mode must be 'outcome' (got {self.grpo.advantage_mode!r})")
        return self


class StudentConfig(Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="names its artifacts (students/<name>/) and metrics (eval/<name>/...)")
    path: UserPath | None = Field(None, description="an existing small model; None = build `model` from scratch")
    model: ModelArch | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.path is None) == (self.model is None):
            raise ValueError("a student needs exactly one of path or model")
        return self


class DistillConfig(Strict):
    """SFT of smaller students on the synthesized set, each compared with the same architecture trained without it."""

    # tiny defaults: a 0.25M-parameter student of the 0.83M teacher; from scratch it needs a few hundred steps (and
    # at least ~1,500 distinct reasoning samples: on 600 it memorises them and does not generalise) to learn addition
    students: list[StudentConfig] = Field(default_factory=lambda: [StudentConfig(
        name="student-96", model=ModelArch(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=288))], min_length=1)
    sft: SFTConfig = SFTConfig(max_steps=600, batch_size=32, learning_rate=5e-3, warmup_steps=10, log_every=25)
    baseline_steps: int | None = Field(None, ge=1, description="steps of the undistilled baseline (None: same as student)")
    baseline: bool = Field(True, description="train and evaluate the undistilled baseline of each student")
    evaluate_teacher: bool = Field(True, description="evaluate the teacher on the held-out prompts too")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.students]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"student names must be unique; repeated: {dup}")
        return self
