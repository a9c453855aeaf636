"""The recipe: one typed, validated description of a pipeline run, loaded from YAML or a named preset.

Every count, size and model is configuration. Validation happens here, before anything heavy is imported or loaded,
and a bad value fails naming its field (pydantic's `loc`), e.g. `base_model.model.hidden_size: must be divisible ...`.
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from stages.core.config_base import MAX_GENERATIONS, MAX_SEED, MAX_TOKENS, ModelArch, Strict, UserPath, expand_path
from stages.core.configs import (
    ColdStartConfig,
    DistillConfig,
    GeneralSFTConfig,
    PreferenceRLConfig,
    R1ZeroConfig,
    ReasoningRLConfig,
    SynthesizeConfig,
)
from stages.core.cron import is_valid_cron
from stages.core.order import ORDER

PRESET_DIR = Path(__file__).resolve().parents[1] / "recipes"
# MLflow's tracking stores (mlflow.tracking._tracking_service.utils) plus the SQLAlchemy databases it takes
TRACKING_SCHEMES = {"sqlite", "http", "https", "file", "databricks", "databricks-uc", "uc", "postgresql", "mysql",
                    "mssql"}


class TrackingConfig(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///file, http://host:port, ...)")
    experiment: str = Field("r1-pipeline", min_length=1, description="MLflow experiment name")
    artifact_location: str | None = Field(None, description="artifact root for a new experiment (default: ./mlartifacts)")
    ui: str | None = Field(None, description="address of an MLflow UI over this store (e.g. `r1 up`'s "
                           "http://127.0.0.1:5000), used for links in pipeline summaries; a http:// uri is its own UI")

    @field_validator("uri")
    @classmethod
    def _known_store(cls, uri: str) -> str:
        if ":" not in uri:
            return uri  # a local folder: MLflow's file store
        scheme = uri.split(":", 1)[0].lower()
        if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
            raise ValueError(f"unknown scheme {scheme or '(none)'!r}; MLflow takes {sorted(TRACKING_SCHEMES)} "
                             "(e.g. sqlite:///mlflow.db, http://127.0.0.1:5000, file:./mlruns)")
        if scheme == "sqlite" and uri.rstrip("/") in ("sqlite:", "sqlite:/", "sqlite://", "sqlite:///"):
            raise ValueError("sqlite:/// needs a file path (sqlite:///mlflow.db); without one the store is in memory "
                             "and lost when the run ends")
        if scheme == "sqlite" and ":memory:" in uri:
            raise ValueError("an in-memory sqlite store is lost when the run ends; give a file (sqlite:///mlflow.db)")
        if scheme == "sqlite" and not uri.startswith("sqlite:///"):
            raise ValueError("a sqlite store is sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return uri


class NoiseConfig(Strict):
    """Share of pretraining traces with each flaw, so the base model has R1-Zero's problems to fix."""

    wrong_answer: float = Field(0.25, ge=0, le=1)
    no_tags: float = Field(0.15, ge=0, le=1)
    mixed_language: float = Field(0.2, ge=0, le=1)


class BaseModelConfig(Strict):
    """Where the pipeline's base model comes from: an existing model (path/hub id/URI) or a tiny one built here."""

    source: Literal["build", "pretrained"] = "build"
    path: UserPath | None = Field(None, description="model path, hub id or runs:/ URI when source=pretrained")
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


BENCHMARK_COLUMNS = ("question", "answer", "solution")


class BenchmarkConfig(Strict):
    """An evaluation set from a local JSON-lines file (stages.core.benchmarks), scored the way R1 reports benchmarks."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                      description="names the metrics bench/<name>/...: letters, digits, . _ -")
    path: UserPath = Field(..., description="JSON-lines file, or a shipped fixture's name (aime-fixture, "
                           "math500-fixture)")
    format: Literal["aime", "math500", "jsonl"] = Field(
        "jsonl", description="aime: problem + integer answer; math500: problem + answer (else the solution's \\boxed{}); "
        "jsonl: question + answer")
    columns: dict[str, str] = Field(default_factory=dict, description="our column (question, answer, solution) -> "
                                    "the file's, e.g. {question: Problem, answer: Answer}")
    samples: int | None = Field(None, ge=1, le=MAX_GENERATIONS, description="n samples per problem (default "
                                "eval.samples_per_prompt; R1: 64 for AIME)")
    pass_k: int | None = Field(None, ge=1, le=MAX_GENERATIONS, description="k of pass@k (default: samples); below "
                               "samples, estimated without bias from all n samples (Chen et al. 2021)")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        if unknown := sorted(set(columns) - set(BENCHMARK_COLUMNS)):
            raise ValueError(f"unknown column(s) {unknown}; map {list(BENCHMARK_COLUMNS)} to the file's names")
        return columns


class EvalConfig(Strict):
    """Held-out evaluation run at the end of every stage, and the benchmarks evaluated with it."""

    num_prompts: int = Field(128, ge=1)
    samples_per_prompt: int = Field(4, ge=1, le=MAX_GENERATIONS, description="k for sampled pass@1 averaged over k samples")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (R1 evaluates at temperature 0.6, top-p 0.95)")
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    batch_size: int = Field(64, ge=1)
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list, description="evaluation sets scored after the "
                                              "held-out evaluation: pass@1 over k, cons@k, pass@k")

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, benchmarks: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [b.name for b in benchmarks]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"benchmark name(s) {dup} given twice; each names its metrics bench/<name>/...")
        return benchmarks

    @model_validator(mode="after")
    def _pass_k_within_samples(self):
        for i, b in enumerate(self.benchmarks):
            if b.pass_k is not None and b.pass_k > (n := b.samples or self.samples_per_prompt):
                raise ValueError(f"benchmarks.{i}.pass_k ({b.pass_k}) is more than the {n} samples drawn per problem")
        return self


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
        try:
            fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:  # a lone { or }
            raise ValueError(f"template: {e}; write a literal brace as {{{{ or }}}}") from None
        if not any(f == "question" for f, _, _ in fields):
            raise ValueError("template must contain the placeholder {question}")
        other = sorted({"{" + f + (f"!{c}" if c else "") + (f":{sp}" if sp else "") + "}" for f, c, sp in fields
                        if (f, c, sp) != ("question", None, "")})
        if other:
            raise ValueError(f"template: only {{question}} is filled in; {', '.join(other)} would fail at the first "
                             "prompt (write a literal brace as {{ or }})")
        return self


class ClusterConfig(Strict):
    """Where the stages run. `local` is in-process; the others are launched by infra/ (see README, scaling)."""

    launcher: Literal["local", "torchrun", "deepspeed", "slurm", "kubernetes"] = "local"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 = CPU")
    nproc_per_node: int | None = Field(None, ge=1, description="processes per node (default: gpus_per_node, 1 on "
                                       "CPU); e.g. 2 CPU processes with gloo to try DeepSpeed on a laptop")
    deepspeed_config: UserPath | None = Field(None, description="path of a DeepSpeed JSON config (infra/deepspeed/...)")
    hostfile: UserPath | None = Field(None, description="deepspeed launcher: hostfile (`worker-0 slots=8`, one line a node)")
    master_port: int | None = Field(None, ge=1, le=65535, description="rendezvous port (default: a free one)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for launched processes")
    timeout: float | None = Field(None, gt=0, description="seconds before a launched stage is killed")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the cluster's name in the "
                             "Prefect concurrency limit r1-cluster-<name> (default: the partition, else the launcher)")
    concurrency: int | None = Field(None, ge=1, description="stages launched by Prefect flows that may run on this "
                                    "cluster at once (default: 1 with GPUs, no limit on CPU)")
    crash_retries: int = Field(2, ge=0, le=100, description="r1 serve: times a served flow run whose process died "
                               "(node lost, OOM-killed; marked Crashed) is rescheduled; it resumes from checkpoints")
    # slurm
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = Field(None, description="slurm --time, e.g. 24:00:00 or 2-00:00:00 (days-hours:min:sec)")
    checkpoint_before_limit: int = Field(300, ge=30, description="slurm: seconds before the time limit at which the "
                                         "stage checkpoints and the job is requeued (--signal=B:USR1@<this>)")
    cpus_per_task: int | None = Field(None, ge=1)
    setup: list[str] | None = Field(None, description="slurm: shell lines run before srun")
    # kubernetes (a Prefect work pool; see infra/prefect and docs/scaling.md)
    image: str | None = None
    cpu: str | None = None
    memory: str | None = None
    namespace: str | None = None
    deployment: str | None = Field(None, description="flow/deployment on the Kubernetes work pool")

    @field_validator("time_limit")
    @classmethod
    def _slurm_time(cls, value: str | None) -> str | None:
        if value is not None:
            slurm_seconds(value)
        return value

    @model_validator(mode="after")
    def _multi_node_needs_launcher(self):
        if self.nodes > 1 and self.launcher in ("local", "torchrun", "kubernetes"):
            raise ValueError(f"nodes={self.nodes} needs launcher deepspeed or slurm (got {self.launcher})")
        if self.launcher == "deepspeed" and self.nodes > 1 and not self.hostfile:
            raise ValueError("launcher deepspeed on several nodes needs cluster.hostfile")
        if self.time_limit and self.checkpoint_before_limit >= slurm_seconds(self.time_limit):
            raise ValueError(f"checkpoint_before_limit={self.checkpoint_before_limit} s leaves no time to train within "
                             f"time_limit={self.time_limit} ({slurm_seconds(self.time_limit)} s)")
        return self


_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def slurm_seconds(text: str) -> int:
    """Seconds of a Slurm time limit: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds (sbatch --time)."""
    m = _SLURM_TIME.fullmatch(text.strip())
    if not m:
        raise ValueError(f"time limit {cut(repr(text))} is not a Slurm time: use minutes, MM:SS, HH:MM:SS, D-HH, "
                         "D-HH:MM or D-HH:MM:SS (e.g. 24:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    else:  # MM[:SS]
        seconds = int(a) * 60 + int(b or 0)
    if seconds <= 0:
        raise ValueError(f"time limit {cut(repr(text))} is zero")
    return seconds


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
        check_cron(self.cron)
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, tz: str) -> str:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {cut(repr(tz))}; use an IANA name, e.g. UTC or Europe/Paris") from None
        return tz


def check_cron(cron: str) -> None:
    """Prefect's check (the one `r1 serve` applies), without importing Prefect: see stages/core/cron.py."""
    if not is_valid_cron(cron):
        raise ValueError(f"cron {cut(repr(cron))} is not a valid cron expression (minute 0-59, hour 0-23, day 1-31, month "
                         "1-12, weekday 0-6)")


class Recipe(Strict):
    name: str = Field("tiny", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$",
                      description="names the registered models (r1-<name>-<stage>): letters, digits, . _ -")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output_dir: UserPath = Field("runs", description="local working directory for checkpoints and intermediate files")
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


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a page of YAML; anything bigger is a mistake (or an attack)
MAX_DEPTH = 32  # nesting of YAML collections
MAX_SHOWN = 200  # characters of a value echoed in a message


def cut(text: str, limit: int = MAX_SHOWN) -> str:
    """Text for a message, cut: a 10 MB value must not be echoed whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


def shorten(value, limit: int = MAX_SHOWN) -> str:
    """repr of a value for a message, cut."""
    return cut(repr(value), limit)


class RecipeLoader(yaml.SafeLoader):
    """Safe YAML for recipes: anchors and aliases are refused outright (a 300-byte alias bomb expands to gigabytes),
    a duplicate key is an error naming it and its line (plain YAML keeps the last), nesting is bounded, and
    `1e-3` is a float (YAML 1.2; PyYAML's 1.1 rules read it as a string)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.MarkedYAMLError("while reading a recipe", None, "anchors and aliases (&name, *name) are not "
                                       "allowed in a recipe; write the values out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError("while reading a recipe", None,
                                           f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeConstructor reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)} (first on line {first}); YAML would keep the last "
                    "silently", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def parse_yaml(text: str, where: str):
    """YAML text -> Python values with RecipeLoader; a RecipeError names `where` (a file, or a --set item)."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        detail = str(e).replace('in "<unicode string>", ', '')
        raise RecipeError(f"{where} is not valid YAML: {cut(detail, 2 * MAX_SHOWN)}") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply") from None


def parse_sets(items: list[str] | None) -> dict:
    """`--set key=value` items -> {dotted key: YAML value}; a bad item is named."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise RecipeError(f"--set {cut(item)}: expected key=value")
        key, value = item.split("=", 1)
        if not key.strip():
            raise RecipeError(f"--set {cut(item)}: empty key")
        out[key.strip()] = parse_yaml(value, f"--set {cut(item)}")
    return out


def _format_errors(err: ValidationError, source: str, overrides: dict) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {shorten(value)})"
        lines.append(f"  {_origin(loc, overrides)}{loc}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _origin(loc: str, overrides: dict) -> str:
    """`--set key=value: ` when the bad field came from an override, so the message blames it, not the file."""
    given = next((k for k in overrides if k == loc or k.startswith(loc + ".") or loc.startswith(k + ".")), None)
    return f"--set {cut(given)}={shorten(overrides[given], 60)}: " if given is not None else ""


def _non_finite(node, loc: str = ""):
    """(dotted location, value) of every NaN/inf float in parsed YAML."""
    if isinstance(node, float) and not math.isfinite(node):
        yield loc or "(top level)", node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _non_finite(v, f"{loc}.{k}" if loc else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _non_finite(v, f"{loc}.{i}")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name or a path; RecipeError when it is neither."""
    shown = cut(repr(str(name_or_path)))
    try:
        path = expand_path(name_or_path)
        if not path.exists() and re.fullmatch(r"[A-Za-z0-9._-]+", str(name_or_path)) and \
                (PRESET_DIR / f"{name_or_path}.yaml").exists():
            path = PRESET_DIR / f"{name_or_path}.yaml"
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as e:
        raise RecipeError(f"recipe {shown}: {e.strerror if isinstance(e, OSError) else e}") from None
    if not exists:
        raise RecipeError(f"recipe {shown} is neither a file nor a preset; presets: {presets()}")
    if is_dir:
        raise RecipeError(f"recipe {shown} is a folder; give a YAML file or a preset name ({presets()})")
    return path


def read_recipe_file(path: Path) -> dict:
    """A recipe file's mapping: at most MAX_RECIPE_BYTES, UTF-8, YAML (RecipeLoader), a non-empty mapping."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"recipe file {path} cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a short YAML "
                          "file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})"
                          ) from None
    data = parse_yaml(text, f"recipe file {path}")
    if data is None:
        raise RecipeError(f"recipe file {path} is empty; start from a preset (`r1 validate tiny --show`)")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level (got {type(data).__name__})")
    return data


def load_recipe(name_or_path: str | Path, overrides: dict | None = None) -> Recipe:
    """A preset name (`tiny`, ...) or a YAML path, with optional dotted overrides {"eval.num_prompts": 8}."""
    path = recipe_path(name_or_path)
    data = read_recipe_file(path)
    overrides = overrides or {}
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    bad = [f"  {_origin(loc, overrides)}{loc}: {v} is not a finite number" for loc, v in _non_finite(data)]
    if bad:  # anywhere, also in free-form sections (reward params, schedule overrides) the schema cannot type
        raise RecipeError("\n".join([f"invalid recipe {path}:", *bad]))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, str(path), overrides)) from None


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {cut(key)}: {p!r} is not a section")
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

