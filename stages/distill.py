"""Distillation: SFT of smaller students on the synthesized set (R1 §2.4), each compared with its undistilled baseline.

A student is built from its architecture with the teacher's tokenizer (same vocabulary), or taken from a path. A student
not smaller than the teacher is refused before anything trains (parameter counts from config.json, no weights read).
The baseline of a built student has the same architecture and initial weights, and is pretrained the way the base model
is (its noisy traces, `stages.core.heldout.pretraining_texts`) for the same number of steps; the baseline of a given
student is that model as it was given. Teacher, students and baselines are evaluated on the same held-out prompts.

torch, transformers, datasets and mlflow are imported inside functions: the registry imports every stage, and
`r1 validate` must start fast.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from grpo.logging import MLflowLogger
from stages.core import tracking
from stages.core.configs import DistillConfig, StudentConfig
from stages.core.context import log_evaluation, stage_context
from stages.core.heldout import pretraining_texts
from stages.core.jsonio import write_json_atomic
from stages.core.lineage import StageInputError, resolve_input, use_tracking_for
from stages.core.models import (
    ModelInputError,
    check_model_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    pick_device,
    resolve_model_uri,
)
from stages.core.recipe import Recipe
from stages.core.sft import SFTTrainer

log = logging.getLogger(__name__)

STAGE = "distill"
UPSTREAM = {"data": ("synthesize", "data"), "teacher": ("preference_rl", "model")}


class StudentSizeError(ValueError):
    """A student that is not smaller than its teacher."""


# ---- sizes from configs, no weights

def read_model_config(uri: str) -> dict:
    """config.json of a model URI or path; for a runs:/ URI only that file is downloaded."""

    if uri.startswith("runs:/"):
        import mlflow

        try:
            return json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/") + "/config.json"))
                              .read_text())
        except Exception as e:  # MLflow raises several types for a missing run or file
            raise ModelInputError(f"model URI {uri!r}: no config.json could be read ({e})") from e
    path = check_model_dir(resolve_model_uri(uri))
    return json.loads((path / "config.json").read_text())


def arch_config(arch, vocab_size: int, eos_token_id: int | None, pad_token_id: int | None) -> dict:
    """A Qwen2 config (as config.json would hold it) for a student built from its architecture."""
    return {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": arch.hidden_size,
            "num_hidden_layers": arch.num_hidden_layers, "num_attention_heads": arch.num_attention_heads,
            "num_key_value_heads": arch.num_key_value_heads, "intermediate_size": arch.intermediate_size,
            "max_position_embeddings": arch.max_position_embeddings, "tie_word_embeddings": True,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": None}


def count_parameters(config: dict) -> int:
    """Parameters of the causal LM a config.json describes: built on the meta device, so nothing is allocated."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind = config.get("model_type")
    if kind not in CONFIG_MAPPING:
        return _estimate_parameters(config)
    cfg = CONFIG_MAPPING[kind].from_dict({k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _estimate_parameters(c: dict) -> int:
    """A decoder-only transformer's size from the usual config keys (models whose code transformers lacks)."""
    try:
        h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    except KeyError as e:
        raise ValueError(f"config of model_type {c.get('model_type')!r} lacks {e.args[0]!r}: cannot size it") from None
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads)
    attn = h * h * 2 + 2 * h * (h // heads) * kv
    embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return embed + layers * (attn + 3 * h * inter + 2 * h) + h


def student_config(student: StudentConfig, teacher_config: dict) -> dict:
    if student.path is not None:

        try:
            return read_model_config(student.path)
        except ModelInputError as e:
            raise ModelInputError(f"distill student {student.name!r} (path): {e}") from None
    return arch_config(student.model, teacher_config["vocab_size"], teacher_config.get("eos_token_id"),
                       teacher_config.get("pad_token_id"))


def check_students(cfg: DistillConfig, teacher_config: dict) -> dict[str, int]:
    """name -> parameter count; a student not smaller than the teacher is refused, naming it."""
    if "vocab_size" not in teacher_config:
        raise StudentSizeError("the teacher's config.json has no vocab_size: students cannot be sized against it")
    teacher = count_parameters(teacher_config)
    sizes = {}
    for s in cfg.students:
        n = count_parameters(student_config(s, teacher_config))
        if n >= teacher:
            raise StudentSizeError(f"distill student {s.name!r} has {n:,} parameters, not fewer than the teacher's "
                                   f"{teacher:,}: a student must be smaller than its teacher")
        sizes[s.name] = n
    log.info("distill: teacher %d parameters, students %s", teacher, sizes)
    return sizes


# ---- the synthesized set

def load_sft_examples(uri: str, template: str) -> list[dict]:
    """SFT examples ({prompt, completion} or {messages}) from the synthesized data artifact: a `save_to_disk` folder
    (or a folder of them), parquet or JSON lines, as a local path or a runs:/ URI."""
    import datasets

    try:
        path = resolve_model_uri(uri)
    except ModelInputError as e:
        raise StageInputError(f"distill data: {e}") from None
    ds = _read_dataset(path)
    if ds is None:
        raise StageInputError(f"distill data {path}: no dataset found (expected a save_to_disk folder, .parquet or "
                              ".jsonl files)")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
    cols = set(ds.column_names)
    if "messages" in cols:
        rows = [{"messages": m} for m in ds["messages"]]
    elif "completion" in cols and ({"prompt", "question"} & cols):
        prompts = ds["prompt"] if "prompt" in cols else [template.format(question=q) for q in ds["question"]]
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, ds["completion"], strict=True)]
    else:
        raise StageInputError(f"distill data {path}: needs columns prompt (or question) and completion, or messages; "
                              f"it has {sorted(cols)}")
    if not rows:
        raise StageInputError(f"distill data {path}: the data set is empty")
    return rows


def _read_dataset(path: Path):
    import datasets

    if path.is_file():
        kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(path.suffix)
        return datasets.load_dataset(kind, data_files=str(path), split="train") if kind else None
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    for pattern, kind in (("*.parquet", "parquet"), ("*.jsonl", "json")):
        files = sorted(str(p) for p in path.rglob(pattern))
        if files:
            return datasets.load_dataset(kind, data_files=files, split="train")
    parts = [d for d in sorted(path.rglob("state.json"))]
    if parts:
        return datasets.concatenate_datasets([datasets.load_from_disk(str(p.parent)) for p in parts])
    return None


# ---- students and baselines

def build_student(arch_cfg: dict, seed: int):
    """A fresh Qwen2 causal LM from a config dict; the same seed gives the same initial weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in arch_cfg.items() if k != "model_type"}))
    model.generation_config.eos_token_id = arch_cfg["eos_token_id"]
    model.generation_config.pad_token_id = arch_cfg["pad_token_id"]
    return model


def sft_or_reuse(model, tok, examples: list[dict], sft_cfg, folder: Path, ctx, tag: str):
    """SFT `model` into `folder/model`, resuming from its checkpoints; a finished folder is loaded instead."""

    done = folder / "done.json"
    if done.exists():
        log.info("distill %s: reusing %s", tag, folder / "model")
        return load_model(folder / "model"), json.loads(done.read_text())

    logger = MLflowLogger(run_id=ctx.run_id, prefix=f"{tag}/")
    trainer = SFTTrainer(model, tok, examples, ctx.seeded(sft_cfg), output_dir=folder / "checkpoints", logger=logger,
                         progress=ctx.progress)
    res = trainer.train(resume_from="latest")
    trained = trainer.engine.module
    trained.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    info = {"steps": res.steps, "final_loss": res.final_loss, "seconds": res.seconds}

    write_json_atomic(done, info)  # the marker a rerun trusts: whole or absent
    return trained.eval(), info


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    import mlflow

    cfg = recipe.distill
    data_uri = resolve_input(recipe, inputs, "data", *UPSTREAM["data"])
    teacher_uri = resolve_input(recipe, inputs, "teacher", *UPSTREAM["teacher"])
    use_tracking_for(recipe, data_uri, teacher_uri, *(s.path for s in cfg.students))
    teacher_config = read_model_config(teacher_uri)
    sizes = check_students(cfg, teacher_config)  # before any weights load or anything trains
    examples = load_sft_examples(data_uri, recipe.prompt.template)
    with stage_context(recipe, STAGE, cfg, {"data": data_uri, "teacher": teacher_uri}, parent_run_id, progress) as ctx:
        device = pick_device(recipe.device)
        teacher_dir = resolve_model_uri(teacher_uri)
        teacher_tok = load_tokenizer(teacher_dir, recipe.base_model.trust_remote_code)
        mlflow.log_metrics({"distill/teacher_parameters": count_parameters(teacher_config),
                            "distill/examples": len(examples)})
        tracking.log_dataset(examples, "synthesized", data_uri, "training")
        pretraining = None
        names, first = [], None
        for i, s in enumerate(cfg.students):
            folder = ctx.workdir / "students" / s.name
            if s.path is None:
                arch = student_config(s, teacher_config) | {"eos_token_id": teacher_tok.eos_token_id,
                                                            "pad_token_id": teacher_tok.pad_token_id}
                model, tok = build_student(arch, recipe.seed + i).to(device), teacher_tok
            else:
                model, tok = load_model_and_tokenizer(s.path, device, recipe.base_model.trust_remote_code)
            t0 = time.perf_counter()
            student, info = sft_or_reuse(model, tok, examples, cfg.sft, folder, ctx, s.name)
            steps = info["steps"]
            tracking.make_pyfunc(folder / "model")
            mlflow.log_artifacts(str(folder / "model"), artifact_path=f"students/{s.name}")
            res = log_evaluation(ctx, student, tok, prefix=f"eval/{s.name}/", table=f"samples/{s.name}.json")
            mlflow.log_metrics({f"distill/{s.name}/parameters": sizes[s.name], f"distill/{s.name}/steps": info["steps"],
                                f"distill/{s.name}/train_seconds": info["seconds"],
                                f"distill/{s.name}/stage_seconds": time.perf_counter() - t0})
            if first is None:  # the stage's headline evaluation is its first student's
                first = s.name
                mlflow.log_metrics(res.metrics("eval/"))
                mlflow.log_table({k: [x[k] for x in res.samples] for k in res.samples[0]}, "samples.json")
            del student, model
            if cfg.baseline:
                base_name = f"{s.name}_baseline"
                if s.path is None:
                    if pretraining is None:
                        pretraining = [{"prompt": p, "completion": c} for p, c in pretraining_texts(recipe)]
                    base_cfg = cfg.sft.model_copy(update={"max_steps": cfg.baseline_steps or steps,
                                                          "warmup_steps": min(cfg.sft.warmup_steps,
                                                                              cfg.baseline_steps or steps)})
                    t0 = time.perf_counter()
                    baseline, binfo = sft_or_reuse(build_student(arch, recipe.seed + i).to(device), tok, pretraining,
                                                   base_cfg, ctx.workdir / "baselines" / s.name, ctx, base_name)
                    mlflow.log_metrics({f"distill/{base_name}/steps": binfo["steps"],
                                        f"distill/{base_name}/train_seconds": binfo["seconds"]})
                else:  # a given student is already pretrained: its undistilled self is the baseline
                    baseline = load_model(resolve_model_uri(s.path), device, recipe.base_model.trust_remote_code)
                bres = log_evaluation(ctx, baseline, tok, prefix=f"eval/{base_name}/", table="")
                mlflow.log_metric(f"distill/{s.name}/pass_at_1_gain", res.pass_at_1 - bres.pass_at_1)
                del baseline
            names.append(s.name)
        tracking.log_curves(ctx.run_id, [f"{n}/sft/loss" for n in names])
        if cfg.evaluate_teacher:
            teacher = load_model(teacher_dir, device, recipe.base_model.trust_remote_code)
            log_evaluation(ctx, teacher, teacher_tok, prefix="eval/teacher/", table="")
        return {"run_id": ctx.run_id, "model": f"runs:/{ctx.run_id}/students/{first}", "students": json.dumps(names)}
