"""Loading models and tokenizers the safe way, with cheap checks first.

A model directory is checked (config, safetensors weights, tokenizer files, chat template) before any weights are read,
so a bad path fails in milliseconds naming the file, not after minutes of loading. Weights load as safetensors only and
`trust_remote_code` stays off unless the recipe asks for it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from stages.core.config_base import expand_path
from stages.core.data import hub_offline

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what a model folder needs from the hub: configs, tokenizer, chat template, safetensors weights (never pickles)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# PyTorch's fused attention: no (L x L) scores kept for backward; on CUDA the packed log-prob pass (no padding mask,
# is_causal) runs its flash kernel, so the flash-attn package would add a dependency, not save memory. Transformers
# 5's default too; named so that no default change can bring eager attention's O(L^2) activations back.
ATTENTION = "sdpa"


class ModelInputError(ValueError):
    """A model or tokenizer input that cannot be used; the message names the path and what is missing."""


def resolve_model_uri(uri: str) -> Path:
    """A local directory for a model URI: a path, `runs:/<id>/<artifact>` or `models:/<name>@<alias>` (MLflow)."""
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except Exception as e:  # MLflow raises several types for a missing run/model/alias
            raise ModelInputError(f"model URI {uri!r} could not be resolved in MLflow: {e}") from e
    path = expand_path(uri)
    if path.exists():
        return path
    if looks_like_hub_id(uri):
        return hub_snapshot(uri)
    raise ModelInputError(f"model path {uri!r} does not exist")


def looks_like_hub_id(uri: str) -> bool:
    return not uri.startswith((".", "/", "~")) and bool(HUB_ID.fullmatch(uri))


def hub_snapshot(model_id: str) -> Path:
    """The local folder of a hub model (downloaded where a network exists, else from the local cache): configs,
    tokenizer and safetensors weights only."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=HUB_FILES))
    except Exception as e:  # huggingface_hub raises several types for a missing, gated or unreachable model
        if hub_offline():
            raise ModelInputError(
                f"model {model_id!r} is not a local path and not in the local cache, and HF_HUB_OFFLINE is set: download "
                f"it first with `huggingface-cli download {model_id}` where a network exists, or give its folder"
            ) from None
        raise ModelInputError(f"model {model_id!r} is not a local path, and the hub could not give it: {e}") from e


def check_model_dir(path: str | Path, need_chat_template: bool = False, causal_lm: bool = True) -> Path:
    """Raise ModelInputError naming the first thing missing from a Hugging Face model directory: a config.json mapping,
    an architecture the engine can train (a causal LM, unless `causal_lm` is False: reward models), safetensors weights
    whose headers read, a tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise ModelInputError(f"model path {str(path)!r} is not a directory")
    config = path / "config.json"
    if not config.exists():
        raise ModelInputError(f"{config} is missing: not a Hugging Face model directory")
    cfg = read_json_mapping(config)
    if causal_lm:
        check_causal_lm(cfg, config)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {found}: pickle weights are refused; convert them to safetensors)" if found else ""
        raise ModelInputError(f"no *.safetensors weights in {path}{extra}")
    for f in weights:
        check_safetensors(f)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ModelInputError(f"no tokenizer in {path} (expected one of {list(TOKENIZER_FILES)})")
    if need_chat_template and not _has_chat_template(path):
        raise ModelInputError(f"tokenizer in {path} has no chat template (chat_template.jinja or tokenizer_config.json)")
    return path


def read_json_mapping(f: Path) -> dict:
    """A JSON file holding an object, or ModelInputError naming the file."""
    try:
        data = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelInputError(f"{f} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelInputError(f"{f} is not valid JSON: {e}") from None
    except OSError as e:
        raise ModelInputError(f"{f} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ModelInputError(f"{f} must hold a JSON object (got {type(data).__name__})")
    return data


def check_causal_lm(cfg: dict, where: Path) -> None:
    """The engine trains causal LMs: any other architecture would load as a causal LM with random weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    if "AutoModelForCausalLM" in (cfg.get("auto_map") or {}):
        return  # custom code (trust_remote_code is checked separately)
    archs, model_type = cfg.get("architectures") or [], cfg.get("model_type")
    if archs:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ModelInputError(f"{where}: `architectures` must be a list of class names (got {archs!r})"[:300])
        wrong = [a for a in archs if a not in set(CAUSAL.values())]
        if wrong:
            raise ModelInputError(f"{where}: architecture {wrong[0]} is not a causal language model; the engine trains "
                                  "causal LMs (e.g. Qwen2ForCausalLM, LlamaForCausalLM)")
    elif model_type not in CAUSAL:
        raise ModelInputError(f"{where}: model_type {model_type!r} has no causal language model in transformers")


def check_safetensors(f: Path) -> None:
    """Read a safetensors file's header (not its tensors): a truncated or corrupt file fails here, named."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="np") as st:
            if not list(st.keys()):
                raise ModelInputError(f"{f} holds no tensors")
    except ModelInputError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError and OSError for a bad file
        raise ModelInputError(f"{f} is not a readable safetensors file ({e})") from None
    size = f.stat().st_size
    with f.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelInputError(f"{f} is truncated: its header promises {8 + header_len + end:,} bytes, the file has "
                              f"{size:,}")


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    cfg = path / "tokenizer_config.json"
    return cfg.exists() and bool(read_json_mapping(cfg).get("chat_template"))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Tokenizer with left padding (generation) and a pad token (falls back to eos, with a warning)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ModelInputError(f"tokenizer in {path} has no eos token: generation could never stop")
    if tok.pad_token_id is None:
        log.warning("tokenizer in %s has no pad token; using eos (%r) for padding", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str | Path, device: str = "cpu", trust_remote_code: bool = False, dtype=None):
    """Causal LM from safetensors weights, in eval mode, on `device`, with SDPA attention (remote code: its own
    choice, since its classes may not implement SDPA)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32,
        output_loading_info=True, attn_implementation=None if trust_remote_code else ATTENTION,
    )
    if info.get("missing_keys"):  # never train from random weights silently
        missing = sorted(info["missing_keys"])
        raise ModelInputError(f"model {path}: {len(missing)} weights are not in its safetensors files (e.g. "
                              f"{missing[:3]}); they would start random")
    return model.to(device).eval()


def load_model_and_tokenizer(uri: str, device: str = "cpu", trust_remote_code: bool = False):
    path = check_model_dir(resolve_model_uri(uri))
    return load_model(path, device, trust_remote_code), load_tokenizer(path, trust_remote_code)


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
