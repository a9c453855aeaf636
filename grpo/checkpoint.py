"""Checkpoints that resume exactly: policy, optimiser, scheduler (through the engine), reference model, RNG states,
data position and step counters.

A checkpoint is written into `<name>.tmp` and renamed into place, so a crash never leaves a half-written `checkpoint-N`;
`trainer_state.json` is written last and marks a complete one.

Resume at another world size (N ranks wrote it, M resume it; or DeepSpeed wrote it and one plain-torch process resumes
it): DeepSpeed's shards are consolidated once into a universal checkpoint (`<checkpoint>/universal`, DeepSpeed's
`ds_to_universal`: per parameter its fp32 weights and Adam moments), which any ZeRO stage loads at any size and the
plain-torch engine reads directly; the reference is reassembled from its shards. The weights, the Adam moments and step,
the LR schedule, the counters and the data position continue; each rank's RNG is re-seeded from (seed, step, rank).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch

from grpo.distributed import barrier, rank_and_world
from grpo.engine import reshard_reference
from grpo.faults import fault_point
from grpo.lora import base_fingerprint, has_adapter
from grpo.rollout import mix_seed

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
UNIVERSAL = "universal"  # the consolidated (DeepSpeed universal) form, written on the first resume at another size
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


def load_checkpoint(path: str | Path, engine, reference: torch.nn.Module | None, seed: int = 0) -> dict:
    """Restore engine, reference (if given) and this rank's RNG; returns the trainer state dict. A checkpoint written
    by another number of ranks (or by the other engine) is resharded; `seed` (the run's) then re-seeds each rank."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    check_checkpoint_model(path, model_record(engine.module))
    state = json.loads((path / STATE_FILE).read_text())
    rank, world = rank_and_world()
    written = state.get("world_size", world)
    if same_layout(path, written, world, engine.is_deepspeed):
        engine.load(str(path))
        if reference is not None:
            engine.load_reference(reference, str(path))
        set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))  # tensors and ints: no pickle code
        return state
    if problem := reshard_problem(path, written, world, deepspeed=engine.is_deepspeed,
                                  zero_stage=getattr(engine, "zero_stage", 0), lora=has_adapter(engine.module)):
        raise CheckpointWorldSizeError(problem)
    step = state.get("global_step", state.get("step", 0))  # GRPO's and SFT's step counters
    engine.load_universal(str(universal_checkpoint(path)))
    if reference is not None:
        reshard_reference(reference, str(path), written)
    reseed(seed, step, rank)
    if rank == 0:
        log.info("resumed %s, written by %d rank(s), on %d: weights, Adam moments, LR schedule, counters and data "
                 "position continue; each rank's sampling RNG is re-seeded from (seed %d, step %d, rank), so the run "
                 "is deterministic but not bit for bit the uninterrupted %d-rank run (with rollout_seeding: prompt, "
                 "the same rollouts and, up to float rounding, the same run)", path, written, world, seed, step, written)
    return state


def written_by_deepspeed(path: Path) -> bool:
    return (Path(path) / "engine").is_dir()


def same_layout(path: Path, written: int, world: int, deepspeed: bool) -> bool:
    """Whether checkpoint `path` loads as it is: written by as many ranks as this run has, under the same engine."""
    return written == world and written_by_deepspeed(path) == deepspeed


def reshard_problem(path: Path, written: int, world: int, *, deepspeed: bool, zero_stage: int = 2,
                    lora: bool = False) -> str | None:
    """Why checkpoint `path` (written by `written` ranks) cannot resume on a run of `world` ranks (under DeepSpeed at
    `zero_stage`, or plain torch; training LoRA adapters or not), as one line naming the checkpoint, both sizes and
    what to do; None when it can. Reads no weights: callable before any model loads."""
    where = f"checkpoint {path} was written by {written} rank(s) and this run has {world}"
    back = f"resume it with {written} rank(s) (cluster.nproc_per_node / gpus_per_node, nodes), or move it away to start over"
    if lora:
        return f"{where}: a LoRA checkpoint is not resharded; {back}"
    if not written_by_deepspeed(path):
        return (f"{where} under {'DeepSpeed' if deepspeed else 'plain torch'}: it was written without DeepSpeed (no "
                f"engine/ shards to consolidate), which is not resharded; {back}")
    if not any((path / "engine").glob("*optim_states.pt")):
        return f"{where}: it was written under ZeRO stage 0, which is not resharded (use ZeRO-2 or 3); {back}"
    if deepspeed and zero_stage == 0:
        return f"{where}: this run uses ZeRO stage 0, which cannot load a resharded checkpoint (use ZeRO-2 or 3); {back}"
    return None


def resume_problem(output_dir: str | Path, deepspeed_config: dict | None, lora: bool) -> str | None:
    """reshard_problem for the newest checkpoint in `output_dir` and this run (its world size; DeepSpeed at the
    config's ZeRO stage, or plain torch when there is no config): the refusal a resume would raise, read from the
    checkpoint's files before any model loads. None when there is nothing to resume or it can be resumed."""
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    written = json.loads((path / STATE_FILE).read_text()).get("world_size")
    world = rank_and_world()[1]
    deepspeed = deepspeed_config is not None
    if written is None or same_layout(path, written, world, deepspeed):
        return None
    zero = int((deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0))
    return reshard_problem(path, written, world, deepspeed=deepspeed, zero_stage=zero, lora=lora)


def universal_checkpoint(path: Path) -> Path:
    """`path/universal`: DeepSpeed's universal form of the checkpoint's ZeRO shards, converted once by rank 0 (atomic,
    like the checkpoint) and read by every rank."""
    out = path / UNIVERSAL
    if rank_and_world()[0] == 0 and not (out / "zero").is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = path / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(input_folder=str(path / "engine"), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            ds_to_universal(args)
        os.replace(tmp, out)
    barrier()
    return out


def reseed(seed: int, step: int, rank: int) -> None:
    """This rank's python and torch RNG from (seed, step, rank): a resume at another size is deterministic."""
    s = mix_seed(seed, step, rank)
    random.seed(s)
    torch.manual_seed(s)


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
