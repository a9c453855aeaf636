"""One Prefect flow per stage, for reruns: `r1-reasoning-rl`, `r1-synthesize`, ...

Each takes the recipe, its inputs and overrides as typed parameters (pydantic models, so the Prefect UI shows them as a
form). An input left empty resolves to the newest finished run of its upstream stage in MLflow; a stage whose config
and inputs equal a finished run's is reused unless `force`. A rerun is a one-stage chain: one parent MLflow run
(`<stage>-<recipe>`) with the stage's run nested under it, like a pipeline run.
"""

import time
from typing import Any

from prefect import Flow, flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, create_model

from flows.pipeline import cancel_on_interrupt, recipe_label, run_chain
from stages.core.order import INPUTS, ORDER


class StageRequest(BaseModel):
    """What every stage rerun takes besides its inputs."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = Field("tiny", description="recipe preset name (tiny, qwen2.5-7b) or path to a YAML recipe on the "
                        "machine that runs the flow")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted recipe overrides, e.g. "
                                      '{"reasoning_rl.grpo.total_steps": 200}')
    force: bool = Field(False, description="rerun even if a finished run has the same config and inputs")


def inputs_model(stage: str) -> type[BaseModel]:
    """`<Stage>Inputs`: one optional field per input of `stage` (a URI, run id or registered model alias)."""
    fields = {
        key: (str | None, Field(None, description=f"{art} of a {up} run: runs:/<id>/{art}, a run id, "
                                f"models:/<name>@<alias> or a path; empty: the newest finished {up} run"))
        for key, (up, art) in INPUTS[stage].items()
    }
    title = "".join(part.title() for part in stage.split("_")) + "Inputs"
    return create_model(title, __config__=ConfigDict(extra="forbid"), **fields)


def flow_name(stage: str) -> str:
    """r1-zero, r1-cold-start-sft, r1-reasoning-rl, ..."""
    name = stage.replace("_", "-")
    return name if name.startswith("r1-") else "r1-" + name


def _stage_flow(stage: str) -> Flow:
    Inputs = inputs_model(stage)

    def rerun(request: StageRequest = StageRequest(), inputs: Inputs = Inputs()) -> dict:  # noqa: B008 (Prefect form defaults)
        given = {k: v for k, v in inputs.model_dump().items() if v}
        return cancel_on_interrupt(lambda: run_chain(request.recipe, [stage], request.overrides,
                                                     [stage] if request.force else None, given, run_name=stage))

    rerun.__name__ = rerun.__qualname__ = stage  # the served deployment's entrypoint: flows/stage_flows.py:<stage>
    rerun.__annotations__ = {"request": StageRequest, "inputs": Inputs, "return": dict}
    rerun.__doc__ = (f"Rerun stage {stage} alone (inputs: {', '.join(INPUTS[stage]) or 'none'}). Empty inputs resolve "
                     "to the newest finished upstream run in MLflow; unchanged config and inputs reuse a finished run "
                     "unless `force`.")
    def run_name() -> str:  # `tiny · reasoning_rl · 2026-11-30 10:15`
        request = flow_run.parameters.get("request") or {}
        recipe = request.get("recipe", "tiny") if isinstance(request, dict) else request.recipe
        return f"{recipe_label(recipe)} · {stage} · {time.strftime('%Y-%m-%d %H:%M')}"

    return flow(rerun, name=flow_name(stage), flow_run_name=run_name, persist_result=True)


STAGE_FLOWS: dict[str, Flow] = {name: _stage_flow(name) for name in ORDER}
globals().update(STAGE_FLOWS)  # module attributes named after the stages, where Prefect's entrypoints look
