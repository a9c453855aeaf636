"""LoRA adapters (Hu et al. 2021) on the policy, through peft: W x + (alpha/r)·B A x, with only A and B trained.

The adapters are injected into the Hugging Face model in place (`peft.inject_adapter_in_model`), not wrapped in a
PeftModel: the policy stays a `...ForCausalLM` whose `base_model` is the transformer body, so the log-prob paths,
`generate` and the checkpoints see the model they always did; the fast path steps aside (its projections are no longer
plain nn.Linear).

The reference model. GRPO resets π_ref ← π_θ at each iteration (DeepSeekMath §4.1), and with LoRA π_θ = base +
adapter, so "the base with adapters disabled" is π_ref only until the first reset. `frozen_reference` is the faithful
version at the price of an adapter: the same modules sharing every base weight (held once), with a frozen copy of the
adapter's A and B. Before any update B is zero (peft's init), so the first iteration's reference (the only one when
`iterations` is 1) is exactly the base with adapters disabled. A separate module tree rather than a second peft adapter
switched on around the reference's forward: the reference stays a model like any other for the trainer and the
log-prob paths, and peft's `set_adapter` would also flip which weights require gradients.

What is saved: checkpoints hold `trained_state_dict` (the adapter; the frozen base comes from the model directory, and
`base_fingerprint` in the checkpoint refuses a resume over other base weights), the stage's model is
`merged_state_dict` (W + (alpha/r)·B A under the plain Hugging Face names) and vLLM is fed `merged_weights`: a plain
model folder, loaded by every later stage as today. The policy itself is never merged.
"""

from __future__ import annotations

import copy
import hashlib
import re
import sys
from collections.abc import Iterable, Iterator

import torch

from grpo.config import LoRAConfig

ADAPTER = "default"  # peft's name of the one adapter we train
ADAPTER_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")  # peft's adapter_layer_names


def add_adapter(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """Inject LoRA adapters into `model` in place (the base weights frozen, A random, B zero: the same function)."""
    from peft import LoraConfig, inject_adapter_in_model

    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none")
    try:
        return inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"lora.target_modules={list(cfg.target_modules)}: {e} (its Linear layers: {linears})") from None


def has_adapter(model: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:  # no adapter exists before peft is imported: full fine-tuning never imports it
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ADAPTER_KEY.search(k)}


def base_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the frozen base weights (plain names, per-tensor float64 sum and norm, no copies; where the adapters
    sit does not change it): a LoRA checkpoint holds the adapter only, so a resume must find the same base under it
    (grpo.checkpoint records and checks this)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not ADAPTER_KEY.search(name):
                total, norm = t.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(t, dtype=torch.float64).item()
                digest.update(f"{name.replace('.base_layer.', '.')}:{total!r}:{norm!r};".encode())
    return digest.hexdigest()[:16]


def trained_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of `model`: its adapter when it has one, else every weight."""
    return adapter_state_dict(model) if has_adapter(model) else model.state_dict()


def load_trained_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `trained_state_dict`'s output back; a checkpoint of another adapter (or of a full model) is refused."""
    if not has_adapter(model):
        model.load_state_dict(state)
        return
    mine = {k: v.shape for k, v in adapter_state_dict(model).items()}
    extra, missing = sorted(set(state) - set(mine)), sorted(set(mine) - set(state))
    shapes = sorted(k for k in set(mine) & set(state) if state[k].shape != mine[k])
    if extra or missing or shapes:
        raise ValueError(f"{where} does not hold this model's LoRA adapter (lora.rank or lora.target_modules changed "
                         f"since it was written?): {len(missing)} adapter weights missing (e.g. {missing[:2]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:2]}), {len(shapes)} of another shape (e.g. "
                         f"{shapes[:2]})")
    model.load_state_dict(state, strict=False)


def merged_weights(model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of `model` (its state dict or named parameters) as the merged plain model has them: adapter
    weights dropped, `x.base_layer.weight` renamed `x.weight` and given W + (alpha/r)·B A. New tensors: the model is
    not changed."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in named:
        if ADAPTER_KEY.search(name):
            continue
        owner, base, leaf = name.rpartition(".base_layer.")
        if not base:
            yield name, tensor
            continue
        if leaf == "weight":
            with torch.no_grad():
                tensor = tensor + layers[owner].get_delta_weight(ADAPTER).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the merged model under the plain Hugging Face names (what `save_pretrained` writes)."""
    return dict(merged_weights(model, model.state_dict().items()))


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """π_ref for a LoRA policy: a module tree like `model`'s whose base weights are the policy's own tensors (shared,
    never copied) and whose adapters are frozen copies of the policy's current ones. Its modules are shallow copies,
    so `eval()` on it leaves the policy's training flags alone; never move or cast it (`.to` would reach the shared
    weights)."""
    from peft.tuners.lora import LoraLayer

    def share(module: torch.nn.Module) -> torch.nn.Module:
        out = copy.copy(module)  # own __dict__: own training flag, the same parameter and buffer tensors
        out._parameters, out._buffers = dict(module._parameters), dict(module._buffers)
        adapters = LoraLayer.adapter_layer_names if isinstance(module, LoraLayer) else ()
        out._modules = {name: child if child is None else copy.deepcopy(child) if name in adapters else share(child)
                        for name, child in module._modules.items()}
        return out

    reference = share(model)
    for name, p in reference.named_parameters():
        if ADAPTER_KEY.search(name):
            p.requires_grad_(False)
    return reference.eval()
