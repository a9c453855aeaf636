"""The optimiser side of training, behind one small interface, so the trainer has one code path:
plain PyTorch (one process) or DeepSpeed ZeRO-2/3 (any number of ranks, CPU with gloo or GPUs).

The trainer calls `backward(loss)` once per micro-batch, then `step() -> grad norm` once per optimiser update; forward
passes use `engine.module`.
"""

from __future__ import annotations

import copy
import glob
import logging
import math
import os

import torch

from grpo.distributed import all_reduce_max, rank_and_world
from grpo.lora import frozen_reference, has_adapter, load_trained_state_dict, merged_state_dict, trained_state_dict


def lr_lambda(warmup_steps: int, total_updates: int, schedule: str):
    """Linear warmup, then constant or cosine decay to 0 over the remaining updates."""

    def f(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (update - warmup_steps) / max(1, total_updates - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def runtime_config(ds_config: dict, max_grad_norm: float | None, world: int, precision: str = "fp32",
                   micro_batch_size: int | None = None, accumulation: int = 1) -> dict:
    """A copy of a DeepSpeed config with what the loop sets (infra/deepspeed/README.md): clipping from max_grad_norm,
    bf16/fp16 from the precision, and the batch keys. Without micro-batching one backward makes one update (the
    loop's minibatch is one micro-batch); with it, `accumulation` micro-batches of `micro_batch_size` make one."""
    cfg = copy.deepcopy(ds_config)
    if micro_batch_size is None:
        cfg.setdefault("train_micro_batch_size_per_gpu", 1)
        cfg["gradient_accumulation_steps"] = 1
        cfg.setdefault("train_batch_size", cfg["train_micro_batch_size_per_gpu"] * world)
    else:
        cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
        cfg["gradient_accumulation_steps"] = accumulation
        cfg["train_batch_size"] = micro_batch_size * accumulation * world
    # the config's max_grad_norm rules; DeepSpeed would otherwise clip at its own default of 1.0
    cfg["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": precision == "fp16"}
    if precision == "bf16":
        cfg["bf16"].setdefault("check_grad_overflow", True)  # otherwise ZeRO applies NaN/inf bf16 updates
    return cfg


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference model: a copy of the policy's current weights, never trained. A LoRA policy's copies only its
    adapter and shares the frozen base weights (grpo.lora.frozen_reference)."""
    if has_adapter(model):
        return frozen_reference(model)
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


class _SkipCounter:
    """Non-finite updates are skipped, not applied: `skipped_steps` counts them (all ranks agree), `last_skipped` says
    whether the latest `step()` was one."""

    skipped_steps: int = 0
    last_skipped: bool = False
    _loss_finite: bool = True

    def _note_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss: the update is skipped when any of its micro-batches' losses is not finite."""
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def _count(self, skipped: bool) -> None:
        self.last_skipped = skipped
        self.skipped_steps += int(skipped)
        self._loss_finite = True  # the next update starts clean


class TorchEngine(_SkipCounter):
    """One process, plain torch.optim. Gradients of successive `backward` calls accumulate until `step`.

    scaler: a GradScaler for fp16 (autocast) training: the loss is scaled before backward and the gradients unscaled
    before clipping; an overflowing (inf/NaN) gradient skips the update and lowers the scale."""

    is_deepspeed = False

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float | None,
                 scaler: torch.amp.GradScaler | None = None):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler

    def backward(self, loss: torch.Tensor) -> None:
        self._note_loss(loss)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        """Clip and apply the gradients; a NaN/inf loss or gradient norm skips the update (and the scheduler step)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        skip = not self._loss_finite or not math.isfinite(float(norm))
        if not skip:
            self.scaler.step(self.optimizer) if self.scaler is not None else self.optimizer.step()
            self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._count(skip)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.module.parameters())

    def make_reference(self) -> torch.nn.Module:
        return frozen_copy(self.module)

    def full_state_dict(self) -> dict:
        """The weights of the model to save: a LoRA policy's merged (grpo.lora.merged_state_dict)."""
        return merged_state_dict(self.module) if has_adapter(self.module) else self.module.state_dict()

    def save_reference(self, reference: torch.nn.Module, directory: str) -> None:
        torch.save(trained_state_dict(reference), os.path.join(directory, "reference.pt"))

    def load_reference(self, reference: torch.nn.Module, directory: str) -> None:
        file = os.path.join(directory, "reference.pt")
        load_trained_state_dict(reference, torch.load(file, weights_only=True), file)

    def save(self, directory: str) -> None:
        """The trained weights (a LoRA policy: the adapter only; the frozen base is the model directory's), the
        optimiser, the scheduler and the loss scaler."""
        torch.save(trained_state_dict(self.module), os.path.join(directory, "policy.pt"))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        torch.save(self.scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), os.path.join(directory, "scaler.pt"))

    def load(self, directory: str) -> None:
        file = os.path.join(directory, "policy.pt")
        load_trained_state_dict(self.module, torch.load(file, weights_only=True), file)
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
        self.scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt"), weights_only=True))
        if self.scaler is not None:
            self.scaler.load_state_dict(torch.load(os.path.join(directory, "scaler.pt"), weights_only=True))

    def load_universal(self, directory: str) -> None:
        """A DeepSpeed universal checkpoint (grpo.checkpoint.universal_checkpoint) into this one process: each trained
        weight (its fp32 master) with its Adam moments and step, and the LR schedule. An fp16 loss scale starts over."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        state, i = {}, 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                saved = universal_param(directory, names[id(p)])
                with torch.no_grad():
                    p.copy_(saved["fp32"].view_as(p))
                state[i] = {"step": saved["step"].float().reshape(()), "exp_avg": saved["exp_avg"].view_as(p),
                            "exp_avg_sq": saved["exp_avg_sq"].view_as(p)}
                i += 1
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.scheduler.load_state_dict(universal_model_states(directory)["lr_scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # a torch optimizer's own checkpoint carries it; the schedule's state does not set it


STALE_BUILD_LOCK_S = 600  # the CPU op builds in about a minute: a lock this old belongs to a killed build


def clear_stale_build_lock(now: float | None = None) -> bool:
    """On CPU, DeepSpeed's process-group setup JIT-builds its shared-memory op under a lock *file* in the torch
    extensions folder; a build that was killed leaves the file, and every later DeepSpeed run on the machine then
    waits on it forever. Remove it when it is far older than a build takes; True if one was removed."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("deepspeed_shm_comm", verbose=False), "lock")
    try:
        age = (now or time.time()) - os.path.getmtime(lock)
    except OSError:
        return False
    if age < STALE_BUILD_LOCK_S:
        return False
    try:
        os.remove(lock)
    except OSError:
        return False
    logging.getLogger(__name__).warning("removed a stale DeepSpeed build lock (%d s old, a killed build's): %s",
                                        age, lock)
    return True


def universal_param(directory: str, name: str) -> dict[str, torch.Tensor]:
    """One parameter of a DeepSpeed universal checkpoint: its whole fp32 value, Adam moments and step."""
    out = {}
    for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
        file = os.path.join(directory, "zero", name, f"{key}.pt")
        if key == "step" and not os.path.exists(file):  # ZeRO-3 keeps one step for all parameters
            out[key] = universal_step(directory)
            continue
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: the universal checkpoint has no {key} for parameter {name}")
        value = torch.load(file, weights_only=True)
        out[key] = value["param"] if isinstance(value, dict) else value  # ZeRO-2 wraps it, ZeRO-3 does not
    return out


def universal_step(directory: str) -> torch.Tensor:
    """The optimizer step of a ZeRO-3 universal checkpoint (its common optimizer state); the file pickles two
    DeepSpeed classes besides tensors, allowed by name (still no arbitrary code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
        common = torch.load(os.path.join(directory, "zero", "optimizer_state.pt"), weights_only=True)
    return common["optimizer_state_dict"]["state"][0]["step"]


def universal_model_states(directory: str) -> dict:
    """The engine-level states (LR schedule, counters) a universal checkpoint keeps: rank 0's model-states file."""
    files = sorted(glob.glob(os.path.join(directory, "*model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{directory}: no DeepSpeed model-states file (*model_states.pt)")
    return torch.load(files[0], weights_only=True)


def reshard_reference(reference: torch.nn.Module, directory: str, written: int) -> None:
    """Load a checkpoint's reference written by `written` ranks into this run's: rank 0's whole `reference.pt`, or
    ZeRO-3's per-rank shards put back together (each parameter's shards in rank order, padding cut); a ZeRO-3 reference
    here keeps this rank's slice of each. The files are memory-mapped and one parameter is whole at a time."""
    rank, world = rank_and_world()
    params = list(reference.named_parameters())
    whole = os.path.join(directory, "reference.pt")
    if os.path.exists(whole):
        saved = torch.load(whole, weights_only=True, mmap=True)
        values = (saved[name].reshape(-1) for name, _ in params)  # lazily: one parameter whole at a time
    else:
        shards = [torch.load(os.path.join(directory, f"reference_shards_rank{r}.pt"), weights_only=True, mmap=True)
                  for r in range(written)]
        values = (torch.cat([s[i].reshape(-1) for s in shards]) for i in range(len(params)))
    with torch.no_grad():
        for (_, p), value in zip(params, values, strict=True):
            if hasattr(p, "ds_tensor"):  # this rank's slice of the whole, padded as ZeRO-3 pads
                part = p.ds_tensor.numel()
                padded = torch.nn.functional.pad(value[: p.ds_numel], (0, part * world - p.ds_numel))
                p.ds_tensor.copy_(padded[rank * part : (rank + 1) * part])
            else:
                p.copy_(value[: p.numel()].view_as(p))
    if zero3 := [p for _, p in params if hasattr(p, "ds_tensor")]:
        _release_gathered(zero3)


class DeepSpeedEngine(_SkipCounter):
    """DeepSpeed ZeRO-2/3. Gradient clipping and the optimiser step belong to DeepSpeed; we keep the same interface.

    Non-finite updates: ZeRO's optimiser already checks the global (all-reduced) gradient norm and skips the update on
    every rank when it is NaN/inf (bf16 only with `check_grad_overflow`, which we switch on); a non-finite loss is
    turned into NaN gradients so that the same check catches it. Stage 0 has no such check: we test the (already
    all-reduced) gradients ourselves and all ranks agree through an all-reduce of the flag.
    """

    is_deepspeed = True

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float | None, ds_config: dict,
                 model_parameters: list | None = None, precision: str = "fp32", micro_batch_size: int | None = None,
                 accumulation: int = 1):
        """optimizer=None: DeepSpeed builds its own from the config's `optimizer` section over `model_parameters`, and
        `scheduler` is then a callable optimizer -> scheduler. `ds_config` is not changed (see `runtime_config`)."""
        import deepspeed

        clear_stale_build_lock()
        cfg = runtime_config(ds_config, max_grad_norm, rank_and_world()[1], precision, micro_batch_size, accumulation)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg, model_parameters=model_parameters
        )
        self.module = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()
        self.ds_config = cfg
        self._reference: torch.nn.Module | None = None  # ZeRO-3: the partitioned reference, built once

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch: its loss is already scaled to its share of the update (no 1/accumulation from DeepSpeed).
        Inside an accumulation, DeepSpeed's `step` only advances its micro-step counter; `step()` below makes the
        boundary's step, the only one that updates."""
        self._note_loss(loss)
        if not bool(torch.isfinite(loss.detach()).all()):
            loss = loss * float("nan")  # NaN gradients: ZeRO's overflow check skips the update on every rank
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        if self.zero_stage == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            bad = not self._loss_finite or any(not bool(torch.isfinite(g).all()) for g in grads)
            if all_reduce_max(float(bad)) > 0:
                self.engine.zero_grad()
                self._count(True)
                return float("nan")
        before = self.engine.skipped_steps
        self.engine.step()
        self._count(self.engine.skipped_steps > before)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def weights_finite(self) -> bool:
        """Every rank's weights (ZeRO-3: its shards) finite; the same answer on every rank."""
        local = [getattr(p, "ds_tensor", p) for p in self.module.parameters()]
        return all_reduce_max(float(not all(bool(torch.isfinite(t).all()) for t in local))) == 0

    def make_reference(self) -> torch.nn.Module:
        """π_ref ← π_θ. ZeRO-2: a frozen full copy (every rank holds the whole weights anyway).

        ZeRO-3: a reference partitioned exactly like the policy, built once under `deepspeed.zero.Init` (never whole on
        any rank) inside a ZeRO-3 inference engine, so its forward gathers layer by layer as the policy's does. Each
        call (each iteration) copies this rank's shard of every policy parameter into the reference's same-shaped
        shard: a reset that gathers nothing. (Parameters offloaded to NVMe are not supported here.)
        """
        if self.zero_stage < 3:
            return frozen_copy(self.module)
        if self._reference is None:
            self._reference = self._partitioned_reference()
        _copy_shards(self.module, self._reference)
        return self._reference

    def _partitioned_reference(self) -> torch.nn.Module:
        import deepspeed

        cfg = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
        cfg["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items() if k != "offload_optimizer"}
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4
            from transformers.modeling_utils import no_init_weights
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # no weight init (the shards are copied in next, and HF's init cannot index empty shards); RNG untouched
        with torch.random.fork_rng(devices=devices), no_init_weights(), deepspeed.zero.Init(config_dict_or_path=cfg):
            ref = type(self.module)(self.module.config)
            ref.tie_weights()  # what the skipped init would have done (tied embeddings share one shard)
        ref.requires_grad_(False)
        self._reference_engine, *_ = deepspeed.initialize(model=ref, config=cfg)  # no optimizer: forward hooks only
        return self._reference_engine.module.eval()

    def save_reference(self, reference: torch.nn.Module, directory: str) -> None:
        """ZeRO-3: every rank writes its own shards of the reference; otherwise rank 0 writes its state dict."""
        rank, _ = rank_and_world()
        if self.zero_stage == 3:
            shards = [p.ds_tensor.detach().cpu().clone() for p in reference.parameters()]
            torch.save(shards, os.path.join(directory, f"reference_shards_rank{rank}.pt"))
        elif rank == 0:
            torch.save(trained_state_dict(reference), os.path.join(directory, "reference.pt"))

    def load_reference(self, reference: torch.nn.Module, directory: str) -> None:
        rank, _ = rank_and_world()
        if self.zero_stage == 3:
            shards = torch.load(os.path.join(directory, f"reference_shards_rank{rank}.pt"), weights_only=True)
            params = list(reference.parameters())
            for p, shard in zip(params, shards, strict=True):
                p.ds_tensor.data.copy_(shard)
            _release_gathered(params)
        else:
            file = os.path.join(directory, "reference.pt")
            load_trained_state_dict(reference, torch.load(file, weights_only=True), file)

    def full_state_dict(self) -> dict:
        """Whole weights for saving the model. ZeRO-3: gathered one parameter at a time (a collective: every rank calls
        this), and only rank 0 keeps them, on the CPU; the other ranks get {}."""
        if self.zero_stage < 3:
            return merged_state_dict(self.module) if has_adapter(self.module) else self.module.state_dict()
        import deepspeed

        rank, _ = rank_and_world()
        out, done = {}, {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) not in done:  # tied weights appear under two names
                if hasattr(t, "ds_id"):
                    with deepspeed.zero.GatheredParameters([t]):
                        done[id(t)] = t.detach().cpu().clone() if rank == 0 else None
                else:
                    done[id(t)] = t.detach().cpu().clone() if rank == 0 else None
            if rank == 0:
                out[name] = done[id(t)]
        return out

    def save(self, directory: str) -> None:
        """A LoRA policy's checkpoint holds its adapter only (frozen parameters excluded)."""
        self.engine.save_checkpoint(directory, tag="engine", exclude_frozen_parameters=has_adapter(self.module))

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag="engine", load_module_strict=not has_adapter(self.module))

    def load_universal(self, directory: str) -> None:
        """A DeepSpeed universal checkpoint (grpo.checkpoint.universal_checkpoint), through DeepSpeed's own loader: each
        rank takes its partition of the weights and Adam moments at this run's size and ZeRO stage; the LR schedule and
        the engine's counters come back too."""
        config = self.engine._config
        config.load_universal_checkpoint = True  # DeepSpeed's `checkpoint.load_universal`, read only by the load
        try:
            loaded, _ = self.engine.load_checkpoint(os.path.dirname(directory), tag=os.path.basename(directory))
        finally:
            config.load_universal_checkpoint = False
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint to load in {directory}")


def _copy_shards(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    """ZeRO-3: reference ← policy, shard by shard on this rank (no communication)."""
    pairs = list(zip(policy.named_parameters(), reference.named_parameters(), strict=True))
    for (name, p), (ref_name, r) in pairs:
        if name != ref_name or p.ds_tensor.shape != r.ds_tensor.shape:
            raise RuntimeError(f"the reference is partitioned unlike the policy at {name} / {ref_name}")
        r.ds_tensor.data.copy_(p.ds_tensor.data)
    for (_, b), (_, rb) in zip(policy.named_buffers(), reference.named_buffers(), strict=True):
        rb.data.copy_(b.data)
    _release_gathered([r for _, (_, r) in pairs])


def _release_gathered(params: list) -> None:
    """Drop the gathered whole copies ZeRO-3 keeps of small ("persistent") parameters, now stale: the next forward
    gathers them again from the new shards (what DeepSpeed does itself after loading a checkpoint)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    if gathered:
        gathered[0].partition(gathered)
