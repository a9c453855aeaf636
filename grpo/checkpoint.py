"""Checkpoints that resume exactly: policy, optimiser, scheduler (through the engine), reference model, RNG states,
data position and step counters.

A checkpoint is written into `<name>.tmp` and renamed into place, so a crash never leaves a half-written `checkpoint-N`;
`trainer_state.json` is written last and marks a complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from grpo.distributed import barrier, rank_and_world
from grpo.faults import fault_point
from grpo.lora import base_fingerprint, has_adapter

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model_config.json"  # the model the checkpoint belongs to: a resume into another one is refused

# config fields that make two models' weights incompatible (Hugging Face config names)
ARCH_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "tie_word_embeddings", "n_embd", "n_layer", "n_head", "d_model")


class CheckpointWorldSizeError(ValueError):
    """A checkpoint written by another number of ranks than the run that would resume from it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model architecture than the one it would be loaded into."""


def model_signature(config: dict | None) -> dict:
    """The architecture fields of a Hugging Face config dict (empty for a model without one)."""
    return {k: config[k] for k in ARCH_FIELDS if config and config.get(k) is not None}


def model_record(module) -> dict:
    """What a checkpoint records of its model: the architecture fields of its Hugging Face config and, for a LoRA model
    (whose checkpoint holds the adapter only), a fingerprint of the frozen base weights."""
    cfg = getattr(module, "config", None)
    record = model_signature(cfg.to_dict() if hasattr(cfg, "to_dict") else None)
    if has_adapter(module):
        record["lora_base_weights"] = base_fingerprint(module)
    return record


def check_checkpoint_model(path: str | Path, here: dict) -> None:
    """Raise CheckpointMismatchError naming the checkpoint file and the differing fields when checkpoint `path` was
    written for another model than the one whose `model_record` is `here` (another architecture, or a LoRA adapter over
    other base weights). Checkpoints without the record pass."""
    record = Path(path) / MODEL_FILE
    if not record.exists() or not here:
        return
    saved = json.loads(record.read_text())
    diff = {k: (saved.get(k), here.get(k)) for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)}
    if diff:
        shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} in the model" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(
            f"checkpoint {Path(path)} ({record.name}) belongs to a different model ({shown}); "
            "resume only with the model it was written from, or move the checkpoint directory away to start fresh"
        )


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, engine, reference: torch.nn.Module | None, trainer_state: dict) -> Path:
    """Write a checkpoint atomically at `path`. Every rank calls it (DeepSpeed saves are collective)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank, world = rank_and_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    fault_point("checkpoint_write", int(m.group(1)) if (m := re.search(r"(\d+)$", path.name)) else 0, by_stage=False)
    if reference is not None:
        engine.save_reference(reference, str(tmp))  # ZeRO-3: every rank its shards
    barrier()
    if rank == 0:
        trainer_state = {**trainer_state, "world_size": world}
        (tmp / MODEL_FILE).write_text(json.dumps(model_record(engine.module), indent=2))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def load_checkpoint(path: str | Path, engine, reference: torch.nn.Module | None) -> dict:
    """Restore engine, reference (if given) and this rank's RNG; returns the trainer state dict."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    check_checkpoint_model(path, model_record(engine.module))
    state = json.loads((path / STATE_FILE).read_text())
    rank, world = rank_and_world()
    if state.get("world_size", world) != world:
        raise CheckpointWorldSizeError(
            f"checkpoint {path} was written by {state['world_size']} ranks and this run has {world}: ZeRO shards the "
            f"optimizer state (ZeRO-3 also the weights and the reference) by rank, so resume it with "
            f"{state['world_size']} ranks (cluster.nproc_per_node / gpus_per_node, nodes), or move it away to start over"
        )
    engine.load(str(path))
    if reference is not None:
        engine.load_reference(reference, str(path))
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))  # tensors and ints: no pickle code
    return state


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-<step>` directories, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for p in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
