"""Preflight: every check that can refuse a run before any model is loaded, in one place.

`preflight(recipe, stages, inputs)` runs before the first stage of a pipeline (flows.pipeline) and before every stage run
(stages.registry wraps each stage's `run`, which covers `r1 stage`, `python -m stages.entry`, the per-stage flows and
the launchers). It reads files, never weights: recipe values the schema cannot judge alone, stage and reward names,
model directories (config, safetensors weights, tokenizer, chat template, custom code), data sets (columns), prompt
lengths against the base tokenizer, the tracking store, the output directory, the launcher's files and tools, the
training memory against the machine (stages/core/memory.py). It reports every problem it finds at once, each naming the
recipe field or the file.

(The recipe schema itself refuses unknown keys and bad values when the recipe loads: stages.core.recipe.RecipeError.)

torch and pyarrow are imported inside functions: preflight runs before any model loads, and must start fast.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from grpo.rewards_io import check_reward_funcs
from rewards import build_rewards
from stages.core import memory
from stages.core.benchmarks import check_benchmarks
from stages.core.config_base import expand_path
from stages.core.configs import BulkGeneration
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
from stages.core.models import (
    ModelInputError,
    check_model_dir,
    load_tokenizer,
    looks_like_hub_id,
    read_json_mapping,
    resolve_model_uri,
)
from stages.core.order import check_stages
from stages.core.recipe import Recipe, cut
from stages.core.tracking import TrackingError, check_tracking

log = logging.getLogger(__name__)

GRPO_STAGES = ("r1_zero", "reasoning_rl", "preference_rl")
SFT_STAGES = ("cold_start_sft", "general_sft")
TIGHT = 0.8  # warn above this share of the machine's memory; refuse above all of it
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
        lambda: check_context(recipe, stages, inputs or {}),
        lambda: check_other_models(recipe, stages),
        lambda: check_data(recipe, stages),
        lambda: check_benchmarks(recipe.eval),
        lambda: check_cluster(recipe, stages),
        lambda: check_lengths(recipe, stages),
        lambda: check_memory(recipe, stages, inputs or {}),
    ]
    for check in checks:
        problems += check()
    if problems:
        raise PreflightError(problems)


# ---- where things are written

def check_output_dir(recipe: Recipe) -> list[str]:
    out = expand_path(recipe.output_dir)
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
    """Inputs given as local paths must exist (models: be usable model directories); MLflow URIs must be well formed
    and name a run or model version that exists in the recipe's store."""
    problems = []
    for key, uri in inputs.items():
        if not uri:
            continue
        if _tracked(uri):
            problems += _mlflow_uri_problems(f"input {key}", uri, recipe)
        elif _remote(uri):  # a hub id while the hub is reachable: checked where it loads
            continue
        elif key in MODEL_INPUTS:
            problems += _model_problems(f"input {key}", uri, recipe, need_chat_template=_chat(recipe))
        elif not expand_path(uri).exists():
            problems.append(f"input {key}: path {uri!r} does not exist")
    return problems


RUNS_URI = re.compile(r"runs:/([0-9a-f]{32})/(\S+)")
MODELS_URI = re.compile(r"models:/([^/@]+)(?:@([A-Za-z0-9_-]+)|/([0-9]+))")


def _mlflow_uri_problems(field: str, uri: str, recipe: Recipe) -> list[str]:
    """A runs:/ or models:/ URI or a bare run id: its form, then (the store being usable) that it exists."""
    uri = uri.strip()
    shown = cut(repr(uri))
    if RUN_ID.fullmatch(uri):
        run_id, ref = uri, None
    elif uri.startswith("runs:/"):
        if not (m := RUNS_URI.fullmatch(uri)):
            return [(f"{field}: {shown} is not a runs:/ URI (runs:/<32-hex run id>/<artifact path>, e.g. "
                    "runs:/0123456789abcdef0123456789abcdef/model)")]
        run_id, ref = m.group(1), None
    elif uri.startswith("models:/"):
        if not (m := MODELS_URI.fullmatch(uri)):
            return [f"{field}: {shown} is not a models:/ URI (models:/<name>@<alias> or models:/<name>/<version>)"]
        run_id, ref = None, m.groups()
    else:
        return []  # other stores (http, s3, mlflow-artifacts:) are read when the stage loads
    try:
        check_tracking(recipe.tracking)
    except TrackingError:
        return []  # reported by check_tracking_store
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=recipe.tracking.uri)
    try:
        if run_id is not None:
            client.get_run(run_id)
        elif ref[1] is not None:
            client.get_model_version_by_alias(ref[0], ref[1])
        else:
            client.get_model_version(ref[0], ref[2])
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing run, model, alias or version
        what = f"run {run_id}" if run_id else "registered model version"
        reason = cut((str(e).splitlines() or [type(e).__name__])[0])
        return [f"{field}: {shown}: no such {what} in {recipe.tracking.uri} ({reason})"]
    return []


def check_context(recipe: Recipe, stages: list[str], inputs: dict[str, str]) -> list[str]:
    """Prompt + completion must fit the model's context (max_position_embeddings): longer sequences fail (or silently
    degrade) at the first step, after the model has loaded."""
    context, source = _context_length(recipe, inputs)
    if context is None:
        return []
    problems = []
    for stage in (s for s in stages if s in GRPO_STAGES):
        g = getattr(recipe, stage).grpo
        if g.max_prompt_length + g.max_completion_length > context:
            problems.append(f"{stage}.grpo.max_completion_length: {g.max_completion_length} completion + "
                            f"{g.max_prompt_length} prompt tokens (max_prompt_length) exceed the {context}-token "
                            f"context of {source}")
    for stage in (s for s in stages if s in ("cold_start_sft", "general_sft")):
        n = getattr(recipe, stage).sft.max_length
        if n > context:
            problems.append(f"{stage}.sft.max_length: {n} tokens exceed the {context}-token context of {source}")
    return problems


def _context_length(recipe: Recipe, inputs: dict[str, str]) -> tuple[int | None, str]:
    """(max_position_embeddings, where it was read) of the model the stages start from, when known without MLflow."""
    model = inputs.get("model")
    if model and not _remote(model) and (expand_path(model) / "config.json").is_file():
        where = expand_path(model) / "config.json"
    elif recipe.base_model.source == "build":
        return recipe.base_model.model.max_position_embeddings, "base_model.model.max_position_embeddings"
    elif (d := _base_tokenizer_dir(recipe)) is not None and (d / "config.json").is_file():
        where = d / "config.json"
    else:
        return None, ""
    try:
        n = read_json_mapping(where).get("max_position_embeddings")
    except ModelInputError:
        return None, ""  # reported by the model checks
    return (n, str(where)) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else (None, "")


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
                problems += _model_problems(f"preference_rl.{field}", uri, recipe, causal_lm=False)
    return problems


def _tracked(uri: str) -> bool:
    """A tracking-store URI or a bare run id: its form and existence are checked in the recipe's store."""
    return uri.startswith(REMOTE_PREFIXES) or bool(RUN_ID.fullmatch(uri))


def _remote(uri: str) -> bool:
    """Checked where it loads: a tracking-store URI, a run id, or a hub id while the hub is reachable (offline, a hub
    id is checked here against the local cache)."""
    hub = looks_like_hub_id(uri) and not Path(uri).expanduser().exists() and not hub_offline()
    return uri.startswith(REMOTE_PREFIXES) or bool(RUN_ID.fullmatch(uri)) or hub


def _chat(recipe: Recipe) -> bool:
    return recipe.prompt.style == "chat"


def _model_problems(field: str, uri: str | None, recipe: Recipe, need_chat_template: bool = False,
                    causal_lm: bool = True) -> list[str]:
    if not uri:
        return [f"{field}: not set"]
    if _tracked(uri):
        return _mlflow_uri_problems(field, uri, recipe)
    if _remote(uri):  # a hub id while the hub is reachable: checked where it loads
        return []
    try:
        path = check_model_dir(resolve_model_uri(uri), need_chat_template=need_chat_template, causal_lm=causal_lm)
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
            auto_map = read_json_mapping(f).get("auto_map") if f.exists() else None
        except ModelInputError as e:
            return [f"{field}: {e}"]
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
        need = [src.columns.get(c, c) for c in (("completion",) if required == "cot" else required)]
        try:
            have = dataset_columns(src, need)
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


def dataset_columns(src, need: list[str] = ()) -> list[str] | None:
    """The column names of a local data set, read from its metadata or, for JSON files, its rows: every row is read
    (a truncated last line, a row that is not an object, non-UTF-8 bytes or a null in a `need` column is an error
    naming the file and the row); None when they cannot be known cheaply (a large .json array)."""
    p = expand_path(src.path)
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
        return _rows_columns(src.path, _jsonl_rows(p, src.path), need)
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
        data = _json_value(p.read_bytes(), src.path, "the file")
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{src.path}: expected a JSON list of rows (objects), or {{\"data\": [rows]}}; got a "
                             f"{type(data).__name__}" + (f" with keys {cut(str(sorted(data)))}" if isinstance(data, dict)
                                                         else ""))
        return _rows_columns(src.path, enumerate(rows, 1), need, "row")
    raise ValueError(f"{src.path}: expected a save_to_disk folder, .parquet, .jsonl, .json or .csv")


def _json_value(raw: bytes, path: str, where: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {where} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {where} is not valid JSON ({e.msg}, column {e.colno}); a truncated file?") from None


def _jsonl_rows(p: Path, path: str):
    with p.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, _json_value(line, path, f"line {n}")


def _rows_columns(path: str, rows, need, unit: str = "line") -> list[str]:
    columns = None
    for n, row in rows:
        if not isinstance(row, dict):
            raise ValueError(  # noqa: TRY004 - bad data, reported with the others by check_data
                f"{path}: {unit} {n} is not a JSON object (got {type(row).__name__}); each row must be one")
        columns = columns or list(row)
        empty = [c for c in need if c in row and row[c] is None]
        if empty:
            raise ValueError(f"{path}: {unit} {n} has no value (null) for {', '.join(map(repr, empty))}")
    if columns is None:
        raise ValueError(f"{path}: the data set is empty")
    return columns


# ---- launchers

def check_cluster(recipe: Recipe, stages: list[str]) -> list[str]:
    c = recipe.cluster
    problems = []
    configs = [("cluster.deepspeed_config", c.deepspeed_config)]
    configs += [(f"{s}.deepspeed_config", getattr(recipe, s).deepspeed_config) for s in stages if s in GRPO_STAGES]
    for field, path in configs:
        if path is not None:
            problems += _json_file_problems(field, path)
    if c.hostfile and not expand_path(c.hostfile).exists():
        problems.append(f"cluster.hostfile: {c.hostfile} does not exist")
    tool = {"slurm": "sbatch", "deepspeed": "deepspeed"}.get(c.launcher)
    if tool and not (shutil.which(tool) or (Path(sys.executable).parent / tool).exists()):
        problems.append(f"cluster.launcher: {c.launcher} needs `{tool}` on PATH, and there is none here")
    if c.launcher in ("torchrun", "deepspeed", "slurm"):
        world = c.nodes * (getattr(c, "nproc_per_node", None) or max(c.gpus_per_node, 1))
        for s in (s for s in stages if s in DISTRIBUTED_STAGES):
            cfg = getattr(recipe, s)
            problems += _lora_problems(recipe, s)
            if s in GRPO_STAGES:  # prompts and minibatches: the trainer's own check
                problems += [f"{s}.grpo.{p}" for p in cfg.grpo.world_problems(world, f" of cluster ({c.nodes} node(s))")]
                continue
            if isinstance(cfg, BulkGeneration) and world % cfg.vllm_tensor_parallel_size:  # vLLM engines span ranks
                problems.append(f"{s}.vllm_tensor_parallel_size: {cfg.vllm_tensor_parallel_size} does not divide the "
                                f"{world} ranks of cluster ({c.nodes} node(s))")
            if hasattr(cfg, "sft"):  # synthesize trains nothing
                problems += [f"{s}.sft.{p}" for p in cfg.sft.world_problems(world, f" of cluster ({c.nodes} node(s))")]
    return problems


def _json_path(path: str) -> Path:
    p = expand_path(path)
    return REPO_ROOT / p if not p.is_absolute() and not p.exists() else p


def _lora_problems(recipe: Recipe, stage: str) -> list[str]:
    """LoRA under the stage's DeepSpeed config (its own, else the cluster's) when it cannot train there (ZeRO-3)."""
    cfg, section = getattr(recipe, stage), "grpo" if stage in GRPO_STAGES else "sft"
    loop, path = getattr(cfg, section, None), getattr(cfg, "deepspeed_config", None) or recipe.cluster.deepspeed_config
    if loop is None or path is None or not loop.lora.enabled or _json_file_problems("", path):
        return []  # a stage that trains nothing; no DeepSpeed; an unreadable file (reported on its own)
    ds = json.loads(_json_path(path).read_bytes())
    return [f"{stage}.{section}.{p} ({path})" for p in loop.lora.deepspeed_problems(ds)]


def _json_file_problems(field: str, path: str) -> list[str]:
    p = _json_path(path)
    if not p.exists():
        return [f"{field}: {path} does not exist"]
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON
        return [f"{field}: {path} is not valid JSON ({cut(str(e))})"]
    if not isinstance(cfg, dict):
        return [f"{field}: {path} must hold a JSON object, not a {type(cfg).__name__}"]
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
    p = expand_path(cfg.path)
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


# ---- memory

def check_memory(recipe: Recipe, stages: list[str], inputs: dict[str, str]) -> list[str]:
    """Refuse a GRPO or SFT stage whose estimated training memory (stages/core/memory.py) exceeds the machine's; warn
    when it takes most of it. Needs the starting model's config.json (built, a local path, or a given input)."""
    config = _model_config(recipe, inputs)
    trained = [s for s in stages if s in GRPO_STAGES or s in SFT_STAGES]
    if config is None or not trained:
        return []
    machine = memory.machine_memory(recipe.device)
    if machine is None:
        return []
    available, what = machine
    world = _world_size(recipe)
    problems = []
    for stage in trained:
        zero = _zero_stage(recipe, stage, world)
        try:
            est = _stage_estimate(recipe, stage, config, zero, world)
        except (KeyError, TypeError, ZeroDivisionError):
            return []  # a config.json without the usual fields: not judged
        section = f"{stage}.grpo" if stage in GRPO_STAGES else f"{stage}.sft"
        said = f"{stage}: estimated training memory {est.describe(zero, world)}"
        knobs = (f"lower {section}.micro_batch_size, set {section}.gradient_checkpointing: true, or shard the model "
                 "states with DeepSpeed ZeRO stage 2/3 over more processes (cluster.deepspeed_config, "
                 "infra/deepspeed/)")
        if est.total > available:
            problems.append(f"{said}; more than the {memory.gib(available)} of {what}: {knobs}")
        elif est.total > TIGHT * available:
            log.warning("%s is %.0f%% of the %s of %s: tight; if it runs out, %s", said,
                        100 * est.total / available, memory.gib(available), what, knobs)
    return problems


def _model_config(recipe: Recipe, inputs: dict[str, str]) -> dict | None:
    model = inputs.get("model")
    if model and not _remote(model) and (expand_path(model) / "config.json").is_file():
        where = expand_path(model) / "config.json"
    elif recipe.base_model.source == "build":
        return {**recipe.base_model.model.model_dump(), "tie_word_embeddings": True}  # stages.base_model builds it so
    elif (d := _base_tokenizer_dir(recipe)) is not None and (d / "config.json").is_file():
        where = d / "config.json"
    else:
        return None
    try:
        return read_json_mapping(where)
    except ModelInputError:
        return None  # reported by the model checks


def _world_size(recipe: Recipe) -> int:
    c = recipe.cluster
    if c.launcher == "local":
        return 1
    return c.nodes * (getattr(c, "nproc_per_node", None) or max(c.gpus_per_node, 1))


def _zero_stage(recipe: Recipe, stage: str, world: int) -> int:
    """The ZeRO stage of the DeepSpeed config the stage would use (its own, else the cluster's); 0 without one or on
    one process."""
    path = getattr(getattr(recipe, stage), "deepspeed_config", None) or recipe.cluster.deepspeed_config
    if path is None or world == 1:
        return 0
    try:
        stage_no = json.loads(expand_path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError, AttributeError):
        return 0  # reported by check_cluster
    return stage_no if isinstance(stage_no, int) and 0 <= stage_no <= 3 else 0


def _stage_estimate(recipe: Recipe, stage: str, config: dict, zero: int, world: int) -> memory.Estimate:
    cfg = getattr(recipe, stage)
    if stage in GRPO_STAGES:
        g = cfg.grpo
        per_rank = (g.minibatch_size or g.prompts_per_step * g.num_generations) // world
        micro = g.micro_batch_size or per_rank
        tokens = g.max_prompt_length + g.max_completion_length
        return memory.estimate(config, g.precision, micro, tokens, g.gradient_checkpointing,
                               logits_positions=min(g.logprob_chunk_size, micro * tokens), zero_stage=zero,
                               world=world, reference_model=g.beta > 0)
    s = cfg.sft
    micro = s.micro_batch_size or s.batch_size // world
    return memory.estimate(config, s.precision, micro, s.max_length, s.gradient_checkpointing,
                           logits_positions=micro * s.max_length, zero_stage=zero, world=world)
