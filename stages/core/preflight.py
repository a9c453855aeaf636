"""Preflight: every check that can refuse a run before any model is loaded, in one place.

`preflight(recipe, stages, inputs)` runs before the first stage of a pipeline (flows.pipeline) and before every stage run
(stages.registry wraps each stage's `run`, which covers `r1 stage`, `python -m stages.entry`, the per-stage flows and
the launchers). It reads files, never weights: recipe values the schema cannot judge alone, stage and reward names,
model directories (config, safetensors weights, tokenizer, chat template, custom code), data sets (columns), prompt
lengths against the base tokenizer, the tracking store, the output directory, the launcher's files and tools. It reports
every problem it finds at once, each naming the recipe field or the file.

(The recipe schema itself refuses unknown keys and bad values when the recipe loads: stages.core.recipe.RecipeError.)

torch and pyarrow are imported inside functions: preflight runs before any model loads, and must start fast.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from grpo.rewards_io import check_reward_funcs
from rewards import build_rewards
from stages.core.data import (
    CONVERSATION,
    REQUIRED,
    chat_prompt,
    hub_offline,
    load_cot_dataset,
    load_problems,
    prompt_rows,
)
from stages.core.distributed import DISTRIBUTED_STAGES, REPO_ROOT
from stages.core.lineage import RUN_ID, StageInputError
from stages.core.models import ModelInputError, check_model_dir, load_tokenizer, looks_like_hub_id, resolve_model_uri
from stages.core.order import check_stages
from stages.core.recipe import Recipe
from stages.core.tracking import TrackingError, check_tracking

GRPO_STAGES = ("r1_zero", "reasoning_rl", "preference_rl")
MODEL_INPUTS = ("model", "teacher", "r1_zero_model")
REMOTE_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:", "http://", "https://", "s3://", "gs://", "dbfs:")


class PreflightError(StageInputError):
    """One or more problems found before any model was loaded; `problems` lists them, each naming a field or file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = "preflight: " + ("1 problem" if len(problems) == 1 else f"{len(problems)} problems") + \
            " found before any model was loaded:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))


def preflight(recipe: Recipe, stages: list[str], inputs: dict[str, str] | None = None) -> None:
    """Raise PreflightError listing every problem of running `stages` (pipeline order) of `recipe`; `inputs` are the
    URIs given to a single stage (e.g. {"model": "/models/x"})."""
    try:
        stages = check_stages(list(stages))
    except ValueError as e:
        raise PreflightError([str(e)]) from None
    problems: list[str] = []
    checks: list[Callable[[], list[str]]] = [
        lambda: check_output_dir(recipe),
        lambda: check_tracking_store(recipe),
        lambda: check_rewards(recipe, stages),
        lambda: check_stage_values(recipe, stages),
        lambda: check_base_model(recipe, stages),
        lambda: check_inputs(recipe, inputs or {}),
        lambda: check_other_models(recipe, stages),
        lambda: check_data(recipe, stages),
        lambda: check_cluster(recipe, stages),
        lambda: check_lengths(recipe, stages),
    ]
    for check in checks:
        problems += check()
    if problems:
        raise PreflightError(problems)


# ---- where things are written

def check_output_dir(recipe: Recipe) -> list[str]:
    out = Path(recipe.output_dir).expanduser()
    probe = out / f".r1-write-test-{uuid.uuid4().hex[:8]}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return [f"output_dir: cannot write to {out} ({e.strerror or e})"]
    return []


def check_tracking_store(recipe: Recipe) -> list[str]:
    try:
        check_tracking(recipe.tracking)
    except TrackingError as e:
        return [f"tracking.uri: {e}"]
    return []


# ---- names and values

def check_rewards(recipe: Recipe, stages: list[str]) -> list[str]:
    """Every reward of every GRPO stage builds (a known name, known params of the right types) and fits the stage's
    grpo.advantage_mode (process rewards with process supervision)."""
    problems = []
    for stage in (s for s in stages if s in GRPO_STAGES):
        cfg, built = getattr(recipe, stage), []
        for i, spec in enumerate(cfg.rewards):
            try:
                built += build_rewards([spec])
            except (ValueError, TypeError, OSError) as e:
                problems.append(f"{stage}.rewards[{i}] ({spec.name}): {e}")
        if built and len(built) == len(cfg.rewards):
            try:
                check_reward_funcs(built, cfg.grpo.advantage_mode)
            except ValueError as e:
                problems.append(f"{stage}.rewards: {e}")
    return problems


def check_stage_values(recipe: Recipe, stages: list[str]) -> list[str]:
    problems = []
    syn = recipe.synthesize
    if "synthesize" in stages and syn.reasoning_target + syn.general_target == 0:
        problems.append("synthesize.reasoning_target and synthesize.general_target: both 0, nothing to make")
    if recipe.device == "cuda" and recipe.cluster.launcher == "local":
        import torch

        if not torch.cuda.is_available():
            problems.append("device: cuda, but torch sees no CUDA device here (use auto or cpu, or run on a GPU node)")
    return problems


# ---- models

def check_base_model(recipe: Recipe, stages: list[str]) -> list[str]:
    cfg = recipe.base_model
    if cfg.source != "pretrained" or "base_model" not in stages:
        return []
    # every model of the chain inherits the base tokenizer: without a chat template none of them could be chatted with
    return _model_problems("base_model.path", cfg.path, recipe, need_chat_template=True)


def check_inputs(recipe: Recipe, inputs: dict[str, str]) -> list[str]:
    """Inputs given as local paths must exist (models: be usable model directories)."""
    problems = []
    for key, uri in inputs.items():
        if not uri or _remote(uri):
            continue
        if key in MODEL_INPUTS:
            problems += _model_problems(f"input {key}", uri, recipe, need_chat_template=_chat(recipe))
        elif not Path(uri).expanduser().exists():
            problems.append(f"input {key}: path {uri!r} does not exist")
    return problems


def check_other_models(recipe: Recipe, stages: list[str]) -> list[str]:
    """Models named in stage sections: distillation students given by path, preference reward models."""
    problems = []
    if "distill" in stages:
        for i, s in enumerate(recipe.distill.students):
            if s.path:
                problems += _model_problems(f"distill.students[{i}].path", s.path, recipe)
    if "preference_rl" in stages:
        for field in ("helpfulness_model", "harmlessness_model"):
            if (uri := getattr(recipe.preference_rl, field)) is not None:
                problems += _model_problems(f"preference_rl.{field}", uri, recipe)
    return problems


def _remote(uri: str) -> bool:
    """Checked where it loads: a tracking-store URI, a run id, or a hub id while the hub is reachable (offline, a hub
    id is checked here against the local cache)."""
    hub = looks_like_hub_id(uri) and not Path(uri).expanduser().exists() and not hub_offline()
    return uri.startswith(REMOTE_PREFIXES) or bool(RUN_ID.fullmatch(uri)) or hub


def _chat(recipe: Recipe) -> bool:
    return recipe.prompt.style == "chat"


def _model_problems(field: str, uri: str | None, recipe: Recipe, need_chat_template: bool = False) -> list[str]:
    if not uri:
        return [f"{field}: not set"]
    if _remote(uri):
        return []
    try:
        path = check_model_dir(resolve_model_uri(uri), need_chat_template=need_chat_template)
    except ModelInputError as e:
        chat = _chat(recipe) and "chat template" in str(e)
        hint = " (prompt.style is chat: the model's chat template makes the prompts)" if chat else ""
        return [f"{field}: {e}{hint}"]
    return _custom_code_problems(field, path, recipe.base_model.trust_remote_code)


def _custom_code_problems(field: str, path: Path, trusted: bool) -> list[str]:
    """A model whose config or tokenizer names its own code (auto_map) needs trust_remote_code, which stays off unless
    the recipe turns it on."""
    if trusted:
        return []
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        try:
            auto_map = json.loads(f.read_text()).get("auto_map") if f.exists() else None
        except (OSError, json.JSONDecodeError):
            continue
        if auto_map:
            return [(f"{field}: {f} asks to run code shipped with the model (auto_map: {auto_map}); it is only run "
                    "when base_model.trust_remote_code is true: set it only for a model you trust")]
    return []


# ---- data sets

def check_data(recipe: Recipe, stages: list[str]) -> list[str]:
    """Local data sets exist and have the columns their stage reads (hub data sets are checked when they load)."""
    sources = []  # (field, DataSource, required columns (ours), alternatives)
    for stage in stages:
        cfg = getattr(recipe, stage, None)
        if stage in GRPO_STAGES:
            sources.append((f"{stage}.data", cfg.data, REQUIRED))
        if stage == "preference_rl":
            sources.append(("preference_rl.general_data", cfg.general_data, REQUIRED))
        if stage == "synthesize":
            sources += [("synthesize.data", cfg.data, REQUIRED),
                        ("synthesize.general_data", cfg.general_data, REQUIRED)]
        if stage == "cold_start_sft":
            if cfg.data is not None:
                sources.append(("cold_start_sft.data", cfg.data, "cot"))
            elif cfg.prompt_data is not None:
                sources.append(("cold_start_sft.prompt_data", cfg.prompt_data, REQUIRED))
    problems = []
    for field, src, required in sources:
        if src.source != "path":
            continue
        try:
            have = dataset_columns(src)
        except (OSError, ValueError) as e:
            problems.append(f"{field}.path: {e}")
            continue
        if have is None:
            continue
        problems += _missing_columns(field, src, have, required)
    return problems


def _missing_columns(field: str, src, have: list[str], required) -> list[str]:
    name = {ours: src.columns.get(ours, ours) for ours in ("prompt", "completion", "question", "answer", "messages")}
    if required == "cot":  # messages, or completion and prompt or question + answer (data.load_cot_dataset)
        need = [] if name["messages"] in have else \
            ["completion"] + ([] if name["prompt"] in have else ["question", "answer"])
    else:  # a conversation stands in for the question (data.load_problems)
        need = [c for c in required if c != "question" or not any(name[k] in have for k in CONVERSATION)]
    missing = [f"{name[c]!r}" + (f" (for {c})" if name[c] != c else "") for c in need if name[c] not in have]
    if not missing:
        return []
    return [(f"{field}: data set {src.path} has no column {', '.join(missing)}; it has {sorted(have)} "
            f"(map yours with {field}.columns, e.g. {{question: <column>}})")]


def dataset_columns(src) -> list[str] | None:
    """The column names of a local data set, read from its metadata or first row (not the whole file); None when they
    cannot be known cheaply (a large .json array)."""
    p = Path(src.path).expanduser()
    if not p.exists():
        raise OSError(f"data set {src.path!r} does not exist")
    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            if src.split not in splits:
                raise ValueError(f"data set {src.path}: no split {src.split!r} (splits: {splits})")
            p = p / src.split
        info = p / "dataset_info.json"
        if not info.exists():
            raise ValueError(f"{src.path}: not a save_to_disk data set folder (no dataset_info.json)")
        return list(json.loads(info.read_text()).get("features", {}))
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(p).names)
    if p.suffix == ".jsonl":
        with p.open() as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"{src.path}: the first row is not a JSON object")
                    return list(row)
        raise ValueError(f"{src.path}: the data set is empty")
    if p.suffix == ".csv":
        import csv

        with p.open(newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise ValueError(f"{src.path}: the data set is empty")
        return header
    if p.suffix == ".json":
        if p.stat().st_size > 50_000_000:
            return None
        data = json.loads(p.read_text())
        rows = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []
        return list(rows[0]) if rows and isinstance(rows[0], dict) else None
    raise ValueError(f"{src.path}: expected a save_to_disk folder, .parquet, .jsonl, .json or .csv")


# ---- launchers

def check_cluster(recipe: Recipe, stages: list[str]) -> list[str]:
    c = recipe.cluster
    problems = []
    configs = [("cluster.deepspeed_config", c.deepspeed_config)]
    configs += [(f"{s}.deepspeed_config", getattr(recipe, s).deepspeed_config) for s in stages if s in GRPO_STAGES]
    for field, path in configs:
        if path is not None:
            problems += _json_file_problems(field, path)
    if c.hostfile and not Path(c.hostfile).expanduser().exists():
        problems.append(f"cluster.hostfile: {c.hostfile} does not exist")
    tool = {"slurm": "sbatch", "deepspeed": "deepspeed"}.get(c.launcher)
    if tool and not (shutil.which(tool) or (Path(sys.executable).parent / tool).exists()):
        problems.append(f"cluster.launcher: {c.launcher} needs `{tool}` on PATH, and there is none here")
    if c.launcher in ("torchrun", "deepspeed", "slurm"):
        world = c.nodes * (getattr(c, "nproc_per_node", None) or max(c.gpus_per_node, 1))
        for s in (s for s in stages if s in DISTRIBUTED_STAGES):
            cfg = getattr(recipe, s)
            if s in GRPO_STAGES:  # prompts and minibatches: the trainer's own check
                problems += [f"{s}.grpo.{p}" for p in cfg.grpo.world_problems(world, f" of cluster ({c.nodes} node(s))")]
                continue
            problems += [f"{s}.sft.{p}" for p in cfg.sft.world_problems(world, f" of cluster ({c.nodes} node(s))")]
    return problems


def _json_file_problems(field: str, path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    if not p.exists():
        return [f"{field}: {path} does not exist"]
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{field}: {path} is not valid JSON ({e})"]
    from grpo.training import deepspeed_problems  # lazy: imports torch and deepspeed

    return [f"{field}: {path}: {problem}" for problem in deepspeed_problems(cfg)]


# ---- lengths (needs the base model's tokenizer: a file, not weights)

def check_lengths(recipe: Recipe, stages: list[str]) -> list[str]:
    """Prompts that do not fit the stage's limits, when the base tokenizer is at hand (a pretrained base model given
    as a local directory; a base built here has no tokenizer before its stage has run)."""
    tok_dir = _base_tokenizer_dir(recipe)
    if tok_dir is None:
        return []
    try:
        tok = load_tokenizer(tok_dir, recipe.base_model.trust_remote_code)
    except Exception:  # noqa: BLE001 - an unusable tokenizer is reported by check_base_model
        return []
    problems = []
    for stage in (s for s in stages if s in GRPO_STAGES):
        cfg = getattr(recipe, stage)
        longest, prompt = _longest(tok, _stage_prompts(recipe, cfg.data, tok))
        if longest > cfg.grpo.max_prompt_length:
            problems.append(f"{stage}.grpo.max_prompt_length: {cfg.grpo.max_prompt_length} tokens, but the longest "
                            f"prompt of {stage}.data is {longest} tokens ({prompt[:60]!r}...); raise it")
    cs = recipe.cold_start_sft
    if "cold_start_sft" in stages and cs.data is not None and cs.data.source == "path":
        try:
            examples = load_cot_dataset(cs.data, recipe.prompt, cs.target_size)
            prompts = [chat_prompt(tok, e["messages"][:-1]) if "messages" in e else e["prompt"] for e in examples]
        except (ValueError, OSError):
            return problems  # reported by check_data (or check_base_model: no chat template)
        longest, prompt = _longest(tok, prompts)
        if longest >= cs.sft.max_length:
            problems.append(f"cold_start_sft.sft.max_length: {cs.sft.max_length} tokens, but the longest prompt of "
                            f"cold_start_sft.data is {longest} tokens ({prompt[:60]!r}...); nothing would be left "
                            "to learn from: raise it")
    return problems


def _base_tokenizer_dir(recipe: Recipe) -> Path | None:
    cfg = recipe.base_model
    if cfg.source != "pretrained" or not cfg.path or _remote(cfg.path):
        return None
    p = Path(cfg.path).expanduser()
    return p if p.is_dir() else None


def _stage_prompts(recipe: Recipe, src, tok) -> list[str]:
    try:
        rows = prompt_rows(load_problems(src, "train", seed=recipe.seed), recipe.prompt)
        return [chat_prompt(tok, r["messages"]) if "messages" in r else r["prompt"] for r in rows]
    except (ValueError, OSError):
        return []  # reported by check_data (or check_base_model: no chat template)


def _longest(tok, texts: list[str]) -> tuple[int, str]:
    best = (0, "")
    for t in texts:
        n = len(tok(t, add_special_tokens=False)["input_ids"])
        if n > best[0]:
            best = (n, t)
    return best
