"""Training scaffolding, written once for every loop (GRPO, SFT, base-model pretraining): the optimiser and its LR
schedule, the Torch/DeepSpeed engine, the non-finite guard, checkpoints (save, resume, prune), fault points and the
metric logger. A loop owns its loss and its data; everything around them is here.

    run = Training(model, cfg, total_updates, loop="sft", output_dir=out, logger=logger, deepspeed_config=ds)
    state = run.resume(path)                       # the trainer state dict it saved, counters restored
    while ...:
        run.start_step()
        run.engine.backward(loss); run.engine.step()
        run.end_step()                             # counts bad steps in a row
        if due: run.save(path, state)
        run.stop_if_non_finite(step, save)         # NonFiniteError (after a checkpoint) when too many
        run.stop_if_preempted(step, save)          # Preempted (after a checkpoint) when asked to stop (SIGUSR1)
        run.fault_point(step)
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import torch

from grpo import preemption
from grpo.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from grpo.config import LoRAConfig
from grpo.distributed import rank_and_world
from grpo.engine import DeepSpeedEngine, TorchEngine, lr_lambda
from grpo.faults import fault_point
from grpo.logging import MetricLogger, NullLogger
from grpo.lora import add_adapter

log = logging.getLogger(__name__)
PRECISION_DETAIL = {"fp32": "fp32 weights", "bf16": "bf16 weights", "fp16": "fp32 weights, autocast fp16, loss scaling"}


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a NaN or inf loss or gradient; the run stopped (a checkpoint is kept)."""


class OptimizerSettings(Protocol):
    """The fields a loop's config shares with every other loop's (GRPOConfig, SFTConfig)."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    max_grad_norm: float | None
    max_bad_steps: int
    precision: str  # fp32 | bf16 | fp16
    gradient_checkpointing: bool
    micro_batch_size: int | None
    lora: LoRAConfig
    seed: int


def build_engine(model: torch.nn.Module, cfg: OptimizerSettings, total_updates: int,
                 deepspeed_config: dict | None = None, accumulation: int = 1) -> TorchEngine | DeepSpeedEngine:
    """AdamW (the config's lr, betas, weight decay) with warmup + constant/cosine LR over `total_updates`, behind plain
    torch on one process or DeepSpeed ZeRO on any number of ranks. A DeepSpeed config that offloads the optimizer or
    has an `optimizer` section gets DeepSpeed's own optimizer (ZeRO-Offload refuses a torch one), with our settings.
    `accumulation`: micro-batches per update (DeepSpeed's gradient_accumulation_steps); fp16 on plain torch gets a
    GradScaler."""
    _, world = rank_and_world()
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(cfg.warmup_steps, total_updates, cfg.lr_schedule)
    batching = {"precision": cfg.precision, "micro_batch_size": cfg.micro_batch_size, "accumulation": accumulation}
    if deepspeed_config is not None and deepspeed_builds_optimizer(deepspeed_config):
        ds = copy.deepcopy(deepspeed_config)
        section = ds.setdefault("optimizer", {"type": "AdamW"})
        section.setdefault("params", {}).update(lr=cfg.learning_rate, betas=[cfg.adam_beta1, cfg.adam_beta2],
                                                weight_decay=cfg.weight_decay)
        return DeepSpeedEngine(model, None, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                               cfg.max_grad_norm, ds, model_parameters=params, **batching)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if deepspeed_config is not None:
        return DeepSpeedEngine(model, optimizer, scheduler, cfg.max_grad_norm, deepspeed_config, **batching)
    if world > 1:
        raise ValueError("world size > 1 needs a deepspeed_config (ZeRO-2/3)")
    device = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device) if cfg.precision == "fp16" else None
    return TorchEngine(model, optimizer, scheduler, cfg.max_grad_norm, scaler)


def prepare_model(model: torch.nn.Module, cfg: OptimizerSettings) -> torch.nn.Module:
    """The model as the loop trains it: with LoRA adapters injected (only they train); bf16 casts the weights, adapters
    included (AdamW then keeps its states in bf16, as torch does); fp32 and fp16 keep fp32 weights (fp16 runs the
    forward under `autocast`). Gradient checkpointing is Hugging Face's, non-reentrant; the fast path's training pass
    honours the same per-layer flag (grpo.fast.shared_prompt)."""
    if cfg.lora.enabled:
        model = add_adapter(model, cfg.lora)
    if cfg.precision == "bf16":
        model.to(torch.bfloat16)
    if cfg.gradient_checkpointing:  # the name every transformers 5.x has (later ones alias activation_checkpointing_*)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def deepspeed_builds_optimizer(ds_config: dict) -> bool:
    """An `optimizer` section, or the optimizer offloaded (ZeRO-Offload): DeepSpeed's optimizer, not a torch one."""
    return "optimizer" in ds_config or "offload_optimizer" in ds_config.get("zero_optimization", {})


def deepspeed_problems(ds_config: dict) -> list[str]:
    """What keeps a DeepSpeed config from training here, found before any model loads: an optimizer offloaded to the
    CPU needs DeepSpeed's CPU Adam, a C++ extension compiled on first use (unless DeepSpeed was installed prebuilt)."""
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") != "cpu":
        return []
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return ["offload_optimizer needs DeepSpeed (`pip install deepspeed`), which is not installed"]
    if installed_ops.get("cpu_adam"):
        return []
    from torch.utils.cpp_extension import is_ninja_available

    missing = [what for what, ok in (("ninja", is_ninja_available()),
                                     ("a C++ compiler", shutil.which(os.environ.get("CXX", "c++")) is not None)) if not ok]
    if not missing:
        return []
    return [(f"offload_optimizer (device cpu) needs DeepSpeed's CPU Adam, which is not prebuilt here and cannot be "
             f"compiled: no {' and no '.join(missing)} (install them, or reinstall DeepSpeed with DS_BUILD_CPU_ADAM=1, "
             "or use a config without offload_optimizer, e.g. infra/deepspeed/zero3.json)")]


class Training:
    """The engine of one loop plus its bookkeeping: bad steps in a row, checkpoints in `output_dir`, metric logging.

    loop: the loop's name in messages ("GRPO", "SFT") and its fault-point kind (lower case); advice: what to look at
    when the loss goes non-finite (the loop's own config field names); accumulation: micro-batches per update. The
    `random` module's state at construction becomes the loop's python stream (seed it before).
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimizerSettings, total_updates: int, *, loop: str,
                 output_dir: str | Path | None = None, logger: MetricLogger | None = None,
                 deepspeed_config: dict | None = None, keep_checkpoints: int | None = None, advice: str = "",
                 accumulation: int = 1):
        self.rank, self.world = rank_and_world()
        self.cfg, self.loop, self.advice = cfg, loop, advice
        if problems := cfg.lora.deepspeed_problems(deepspeed_config):
            raise ValueError("; ".join(problems))
        self.engine = build_engine(prepare_model(model, cfg), cfg, total_updates, deepspeed_config, accumulation)
        log.info("%s: precision %s (%s), %s engine, %s, gradient checkpointing %s, %s", loop, cfg.precision,
                 PRECISION_DETAIL[cfg.precision], type(self.engine).__name__.removesuffix("Engine"),
                 f"{accumulation} micro-batches of {cfg.micro_batch_size} per update" if cfg.micro_batch_size
                 else "one forward per update", "on" if cfg.gradient_checkpointing else "off", self.trained())
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.logger = logger or NullLogger()
        self.keep_checkpoints = keep_checkpoints
        self.bad_in_a_row = 0  # consecutive steps with at least one skipped (non-finite) update
        self._skipped_before = 0
        self._python = random.getstate()  # the loop's own `random` stream (python_random), as the caller seeded it
        preemption.listen()

    def trained(self) -> str:
        """What the optimiser trains, for the log: every weight, or LoRA adapters (their share of the weights)."""
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in self.engine.module.parameters()]
        total, trained = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)  # ds_numel: a ZeRO-3 shard's whole
        if not self.cfg.lora.enabled:
            return f"all {total:,} weights trained"
        lora = self.cfg.lora
        return f"LoRA rank {lora.rank} on {', '.join(lora.target_modules)}: {trained:,} of {total:,} weights trained"

    def autocast(self):
        """The context of the loop's forward passes: autocast(fp16) for fp16 on plain torch (DeepSpeed's fp16 casts
        the model itself), nothing otherwise."""
        if self.cfg.precision != "fp16" or not isinstance(self.engine, TorchEngine):
            return nullcontext()
        return torch.autocast(next(self.engine.module.parameters()).device.type, dtype=torch.float16)

    # ---- the loop's python RNG
    @contextmanager
    def python_random(self) -> Iterator[None]:
        """Run code that draws from the `random` module (reward functions) on the loop's own stream. Other threads of
        the process draw from the same module between steps (Prefect's services, after a flow ran in-process): on the
        shared stream, a run and its resume from a checkpoint would then see different numbers."""
        random.setstate(self._python)
        try:
            yield
        finally:
            self._python = random.getstate()

    # ---- the non-finite guard: a step is bad when any of its updates was skipped
    def start_step(self) -> None:
        self._skipped_before = self.engine.skipped_steps

    def end_step(self) -> None:
        """Count the step that just ended as bad (any update skipped) or good."""
        bad = self.engine.skipped_steps > self._skipped_before
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0

    def stop_if_non_finite(self, step: int, save: Callable[[], Path | None]) -> None:
        """After max_bad_steps bad steps in a row (the last one `step`, from 1): `save()` a checkpoint and raise
        NonFiniteError."""
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            path = save() if self.output_dir is not None else None
            first = step - self.bad_in_a_row + 1
            if path is not None:
                saved = f"Checkpoint of the last finite weights: {path}. "
            elif self.output_dir is None:
                saved = "No output_dir: nothing saved. "
            else:
                saved = self._no_finite_checkpoint()
            raise NonFiniteError(
                f"{self.loop} steps {first}-{step}: {self.bad_in_a_row} steps in a row had a NaN/inf loss or gradient "
                f"(max_bad_steps={self.cfg.max_bad_steps}); their updates were skipped ({self.engine.skipped_steps} in "
                "all) and the run stopped. " + saved + self.advice
            )

    def stop_if_preempted(self, step: int, save: Callable[[], Path | None]) -> None:
        """On a stop request (grpo.preemption: SIGUSR1, the stop file) at the end of step `step`: its checkpoint (the
        one just written, else `save()`), then Preempted."""
        if not preemption.stop_requested():
            return
        last = self.latest()
        if last is None or last.name != f"checkpoint-{step}":
            last = save() if self.output_dir is not None else None
        raise preemption.Preempted(self.loop, step, last)

    def _no_finite_checkpoint(self) -> str:
        last = self.latest()
        return ("The weights are no longer finite (an update before the skipped ones made them NaN/inf): no checkpoint "
                "written. " + (f"The last good checkpoint is {last}. " if last else "There is no earlier checkpoint. "))

    # ---- checkpoints
    def counters(self) -> dict:
        return {"skipped_steps": self.engine.skipped_steps, "bad_in_a_row": self.bad_in_a_row}

    def save(self, path: str | Path, state: dict, reference: torch.nn.Module | None = None) -> Path | None:
        """A checkpoint at `path` (engine, reference, RNG, `state` + the skip counters); the oldest pruned. Non-finite
        weights are never written (a resume would start from them): then nothing is saved and None returned."""
        if not self.engine.weights_finite():
            log.warning("%s: the weights are not finite; checkpoint %s not written (the last good one: %s)",
                        self.loop, path, self.latest())
            return None
        random.setstate(self._python)  # the checkpoint's python RNG is the loop's stream
        saved = save_checkpoint(path, self.engine, reference, {**state, **self.counters()})
        if self.rank == 0 and self.keep_checkpoints is not None:
            prune_checkpoints(saved.parent, self.keep_checkpoints)
        return saved

    def latest(self) -> Path | None:
        return latest_checkpoint(self.output_dir) if self.output_dir is not None else None

    def resume(self, path: str | Path, reference: torch.nn.Module | None = None) -> dict:
        """Load checkpoint `path` into the engine (and the reference); returns the saved trainer state. One written by
        another number of ranks is resharded (grpo.checkpoint), each rank's RNG re-seeded from the config's seed."""
        state = load_checkpoint(path, self.engine, reference, seed=self.cfg.seed)
        self._python = random.getstate()  # restored by load_checkpoint
        self.engine.skipped_steps = state.get("skipped_steps", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        return state

    # ---- metrics and faults
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.logger.log_metrics(metrics, step=step)

    def log_params(self, params: dict) -> None:
        if self.rank == 0:
            self.logger.log_params(params)

    def fault_point(self, step: int) -> None:
        fault_point(self.loop.lower(), step)
