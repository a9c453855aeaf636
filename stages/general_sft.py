"""General SFT (R1 §2.3.3): fine-tune the BASE model (DeepSeek-V3-Base in the paper) on the synthesized set — reasoning
samples rejection-sampled from the RL checkpoint plus general samples — for a few epochs.

mlflow is imported inside functions: the registry imports every stage, and `r1 validate` must start fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core import tracking
from stages.core.context import stage_context
from stages.core.data import DataInputError, load_rows
from stages.core.lineage import resolve_input
from stages.core.models import load_model_and_tokenizer, pick_device
from stages.core.recipe import Recipe
from stages.core.sft_runner import train_and_finish

log = logging.getLogger(__name__)

STAGE = "general_sft"
UPSTREAM = {"model": ("base_model", "model"), "data": ("synthesize", "data")}


def run(recipe: Recipe, inputs: dict | None = None, parent_run_id: str | None = None,
        progress: bool = True) -> dict[str, str]:
    import mlflow

    cfg = recipe.general_sft
    base_uri = resolve_input(recipe, inputs, "model", *UPSTREAM["model"])
    data_uri = resolve_input(recipe, inputs, "data", *UPSTREAM["data"])
    rows = load_sft_rows(recipe, data_uri)  # a bad data set fails here, before any model loads
    with stage_context(recipe, STAGE, cfg, {"model": base_uri, "data": data_uri}, parent_run_id, progress) as ctx:
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r.get("kind") or "unknown"] = kinds.get(r.get("kind") or "unknown", 0) + 1
        if ctx.main:
            mlflow.log_metrics({"data/examples": len(rows)} | {f"data/{k}_examples": n for k, n in kinds.items()})
            tracking.log_dataset(rows, "synthesized", data_uri, "training")
        model, tok = load_model_and_tokenizer(base_uri, pick_device(recipe.device), recipe.base_model.trust_remote_code)
        return train_and_finish(ctx, cfg.sft, model, tok, rows)


def load_sft_rows(recipe: Recipe, data_uri: str) -> list[dict]:
    """Rows with `prompt` and `completion` from a data URI (runs:/<id>/data, an mlflow-artifacts URI) or a local
    save_rows folder; an error names the URI and the missing column."""
    if data_uri.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow

        tracking.setup(recipe.tracking)
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=data_uri))
        except Exception as e:  # MLflow raises several types for a missing run or artifact
            raise DataInputError(f"data URI {data_uri!r} could not be resolved in MLflow: {e}") from e
    else:
        path = Path(data_uri).expanduser()
        if not path.exists():
            raise DataInputError(f"data path {data_uri!r} does not exist")
    try:
        rows = load_rows(path)
    except Exception as e:
        raise DataInputError(f"data {data_uri!r} ({path}) is not a Hugging Face dataset folder: {e}") from e
    if not rows:
        raise DataInputError(f"data {data_uri!r} has no rows")
    missing = [c for c in ("prompt", "completion") if c not in rows[0]]
    if missing:
        raise DataInputError(f"data {data_uri!r}: missing column(s) {missing}; it has {sorted(rows[0])}")
    return rows
