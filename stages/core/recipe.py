"""The recipe: one typed, validated description of a pipeline run, loaded from YAML or a named preset.

Every count, size and model is configuration. Validation happens here, before anything heavy is imported or loaded,
and a bad value fails naming its field (pydantic's `loc`), e.g. `base_model.model.hidden_size: must be divisible ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from stages.core.config_base import ModelArch, Strict
from stages.core.configs import (
    ColdStartConfig,
    DistillConfig,
    GeneralSFTConfig,
    PreferenceRLConfig,
    R1ZeroConfig,
    ReasoningRLConfig,
    SynthesizeConfig,
)
from stages.core.order import ORDER

PRESET_DIR = Path(__file__).resolve().parents[1] / "recipes"


class TrackingConfig(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///file, http://host:port, ...)")
    experiment: str = Field("r1-pipeline", min_length=1, description="MLflow experiment name")
    artifact_location: str | None = Field(None, description="artifact root for a new experiment (default: ./mlartifacts)")
    ui: str | None = Field(None, description="address of an MLflow UI over this store (e.g. `r1 up`'s "
                           "http://127.0.0.1:5000), used for links in pipeline summaries; a http:// uri is its own UI")


class NoiseConfig(Strict):
    """Share of pretraining traces with each flaw, so the base model has R1-Zero's problems to fix."""

    wrong_answer: float = Field(0.25, ge=0, le=1)
    no_tags: float = Field(0.15, ge=0, le=1)
    mixed_language: float = Field(0.2, ge=0, le=1)


class BaseModelConfig(Strict):
    """Where the pipeline's base model comes from: an existing model (path/hub id/URI) or a tiny one built here."""

    source: Literal["build", "pretrained"] = "build"
    path: str | None = Field(None, description="model path, hub id or runs:/ URI when source=pretrained")
    trust_remote_code: bool = Field(False, description="only for a model you trust: runs code shipped with it")
    model: ModelArch = ModelArch()
    task: str = Field("addition", description="problem family for pretraining (see stages.core.tasks)")
    max_digits: int = Field(2, ge=1, le=6)
    noise: NoiseConfig = NoiseConfig()
    train_problems: int = Field(20000, ge=100)
    pretrain_seconds: float = Field(3600.0, gt=0, description="safety cap on wall-clock time; max_steps is the real bound")
    max_steps: int = Field(450, ge=1, description="optimiser steps of pretraining (the build is deterministic for a seed)")
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")

    @model_validator(mode="after")
    def _pretrained_needs_path(self):
        if self.source == "pretrained" and not self.path:
            raise ValueError("source=pretrained needs base_model.path")
        return self


class EvalConfig(Strict):
    """Held-out evaluation run at the end of every stage."""

    num_prompts: int = Field(128, ge=1)
    samples_per_prompt: int = Field(4, ge=1, description="k for sampled pass@1 averaged over k samples")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 1234


R1_ZERO_SYSTEM = (  # DeepSeek-R1 paper, Table 1 (the R1-Zero template), as a system turn
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.")


class PromptConfig(Strict):
    """How a problem becomes a prompt. style `template`: `{question}` in `template` is replaced by the problem text.
    style `chat`: the row's turns (or its question as one user turn), after a `system` turn, through the model's chat
    template (stages.core.data.chat_prompt)."""

    template: str = Field("User: {question}\nAssistant:", description="R1-Zero style template")
    style: Literal["template", "chat"] = Field("template", description="template: `template`; chat: the chat template")
    system: str | None = Field(R1_ZERO_SYSTEM, description="system turn of style chat (null: none)")
    target_language: str = Field("en", description="ISO 639-1 code of the language the CoT should be in")

    @model_validator(mode="after")
    def _has_placeholder(self):
        if "{question}" not in self.template:
            raise ValueError("template must contain the placeholder {question}")
        return self


class ClusterConfig(Strict):
    """Where the stages run. `local` is in-process; the others are launched by infra/ (see README, scaling)."""

    launcher: Literal["local", "torchrun", "deepspeed", "slurm", "kubernetes"] = "local"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 = CPU")
    nproc_per_node: int | None = Field(None, ge=1, description="processes per node (default: gpus_per_node, 1 on "
                                       "CPU); e.g. 2 CPU processes with gloo to try DeepSpeed on a laptop")
    deepspeed_config: str | None = Field(None, description="path of a DeepSpeed JSON config (infra/deepspeed/...)")
    hostfile: str | None = Field(None, description="deepspeed launcher: hostfile (`worker-0 slots=8`, one line a node)")
    master_port: int | None = Field(None, ge=1, le=65535, description="rendezvous port (default: a free one)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for launched processes")
    timeout: float | None = Field(None, gt=0, description="seconds before a launched stage is killed")
    # slurm
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = Field(None, description="slurm --time, e.g. 24:00:00")
    cpus_per_task: int | None = Field(None, ge=1)
    setup: list[str] | None = Field(None, description="slurm: shell lines run before srun")
    # kubernetes (a Prefect work pool; see infra/prefect and docs/scaling.md)
    image: str | None = None
    cpu: str | None = None
    memory: str | None = None
    namespace: str | None = None
    deployment: str | None = Field(None, description="flow/deployment on the Kubernetes work pool")

    @model_validator(mode="after")
    def _multi_node_needs_launcher(self):
        if self.nodes > 1 and self.launcher in ("local", "torchrun", "kubernetes"):
            raise ValueError(f"nodes={self.nodes} needs launcher deepspeed or slurm (got {self.launcher})")
        if self.launcher == "deepspeed" and self.nodes > 1 and not self.hostfile:
            raise ValueError("launcher deepspeed on several nodes needs cluster.hostfile")
        return self


class ScheduleConfig(Strict):
    """A cron schedule for a served deployment (`r1 serve`): the pipeline or one stage, e.g. a nightly rerun."""

    flow: str = Field(..., description="`pipeline` or a stage name, e.g. reasoning_rl")
    cron: str = Field(..., description="cron expression, e.g. '0 2 * * *' (02:00 every day)")
    timezone: str = "UTC"
    active: bool = Field(True, description="false registers the schedule paused")
    force: bool = Field(False, description="rerun the stage even if its config and inputs are unchanged")
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe overrides for the scheduled runs")

    @model_validator(mode="after")
    def _known_flow(self):
        if self.flow != "pipeline" and self.flow not in ORDER:
            raise ValueError(f"unknown flow {self.flow!r}; choose 'pipeline' or a stage: {ORDER}")
        if len(self.cron.split()) != 5:
            raise ValueError(f"cron {self.cron!r} must have 5 fields (minute hour day month weekday)")
        return self


class Recipe(Strict):
    name: str = Field("tiny", min_length=1)
    seed: int = 0
    output_dir: str = Field("runs", description="local working directory for checkpoints and intermediate files")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tracking: TrackingConfig = TrackingConfig()
    prompt: PromptConfig = PromptConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()
    r1_zero: R1ZeroConfig = Field(default_factory=R1ZeroConfig)
    cold_start_sft: ColdStartConfig = Field(default_factory=ColdStartConfig)
    reasoning_rl: ReasoningRLConfig = Field(default_factory=ReasoningRLConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    general_sft: GeneralSFTConfig = Field(default_factory=GeneralSFTConfig)
    preference_rl: PreferenceRLConfig = Field(default_factory=PreferenceRLConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    schedules: list[ScheduleConfig] = Field(default_factory=list, description="cron schedules for `r1 serve`")

    @model_validator(mode="after")
    def _real_scale_is_written_out(self):
        """Section defaults are the tiny preset's toy scale, so a recipe on a pretrained model writes out every one."""
        if self.base_model.source == "build":
            return self
        if missing := unwritten_sections(self):
            raise ValueError(f"base_model.source is {self.base_model.source!r}: every stage section must be written out "
                             f"(the defaults are the tiny preset's toy scale; start from a qwen2.5-* preset); missing: "
                             f"{', '.join(missing)}")
        return self


SCALED_SECTIONS = ("eval", *(s for s in ORDER if s != "base_model"))


def unwritten_sections(recipe: Recipe) -> list[str]:
    """Dotted names of the scale-setting sections the recipe left to their defaults: eval, each stage section, and
    each stage section's own sub-sections (grpo, sft, data, rewards, students, ...)."""
    missing = []
    for name in SCALED_SECTIONS:
        if name not in recipe.model_fields_set:
            missing.append(name)
            continue
        section = getattr(recipe, name)
        for field, info in type(section).model_fields.items():
            default = info.get_default(call_default_factory=True)
            sub = default[0] if isinstance(default, list) and default else default
            if isinstance(sub, BaseModel) and field not in section.model_fields_set:
                missing.append(f"{name}.{field}")
    return missing


class RecipeError(ValueError):
    """A recipe that does not validate; the message names every bad field."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, overrides: dict | None = None) -> Recipe:
    """A preset name (`tiny`, ...) or a YAML path, with optional dotted overrides {"eval.num_prompts": 8}."""
    path = Path(name_or_path)
    if not path.exists() and (PRESET_DIR / f"{name_or_path}.yaml").exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise RecipeError(f"recipe {str(name_or_path)!r} is neither a file nor a preset; presets: {presets()}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, str(path))) from None


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value, for MLflow params."""
    out: dict[str, str] = {}
    for k, v in cfg.model_dump().items():
        _flatten_into(out, f"{prefix}{k}", v)
    return out


def _flatten_into(out: dict, key: str, v) -> None:
    if isinstance(v, dict):
        for k2, v2 in v.items():
            _flatten_into(out, f"{key}.{k2}", v2)
    else:
        out[key] = str(v)

