"""Kubernetes: a run of the `r1-stage` flow deployment on a Prefect work pool (one pod); inside the pod the flow runs
the stage in-process or under torchrun. The pool's base job template is infra/prefect/k8s-base-job-template.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.launch.spec import INFRA_DIR, LaunchError, LaunchSpec, recipe_obj

K8S_TEMPLATE = INFRA_DIR / "prefect" / "k8s-base-job-template.json"


def load_k8s_template(path: str | Path = K8S_TEMPLATE) -> dict:
    return json.loads(Path(path).read_text())


def k8s_job_variables(spec: LaunchSpec) -> dict:
    """Job variables for a flow run on the Kubernetes work pool (override the template's defaults)."""
    out: dict[str, Any] = {"gpus": spec.nproc_per_node}
    for key in ("image", "cpu", "memory", "namespace"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    if spec.env:
        out["env"] = dict(spec.env)
    return out


def fill_k8s_template(values: dict | None = None, template: dict | None = None) -> dict:
    """The job configuration the worker would build: variable defaults, then `values`, put into the placeholders.

    Same merge as Prefect's BaseJobConfiguration.from_template_and_values, without block/variable references.
    """
    from prefect.utilities.templating import apply_values

    template = template or load_k8s_template()
    props = template["variables"].get("properties", {})
    variables = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    variables.update(values or {})
    return apply_values(template=json.loads(json.dumps(template["job_configuration"])), values=variables)


def run_kubernetes(stage, recipe, overrides, parent_run_id, inputs, spec: LaunchSpec, log) -> dict:
    """A run of the `r1-stage` deployment with everything the local launch gets (recipe, overrides, planned inputs,
    parent run); its persisted result is the stage's outputs."""
    from prefect.deployments import run_deployment

    inner = LaunchSpec(target="torchrun" if spec.nproc_per_node > 1 else "local",
                       nproc_per_node=spec.nproc_per_node, master_port=spec.master_port, env=spec.env,
                       module=spec.module, timeout=spec.timeout, workdir=spec.workdir)
    recipe_param = str(recipe) if isinstance(recipe, (str, Path)) else recipe_obj(recipe, None).model_dump(mode="json")
    params = {"stage": stage, "recipe": recipe_param, "overrides": overrides or {}, "parent_run_id": parent_run_id,
              "inputs": inputs or {}, "launch": inner.model_dump(mode="json")}
    log(f"running deployment {spec.deployment} for stage {stage} with job variables {k8s_job_variables(spec)}")
    fr = run_deployment(name=spec.deployment, parameters=params, job_variables=k8s_job_variables(spec),
                        timeout=spec.timeout)
    state = fr.state
    if state is None or not state.is_completed():
        raise LaunchError(f"stage {stage}: flow run {fr.name} ({fr.id}) ended "
                          f"{getattr(state, 'type', None)}: {getattr(state, 'message', '')}")
    try:
        return state.result()
    except Exception as e:  # any storage error means the same thing here
        raise LaunchError(f"stage {stage}: flow run {fr.name} completed but its result could not be read ({e}); "
                          "the pods and this process need shared result storage (PREFECT_LOCAL_STORAGE_PATH on a "
                          "shared volume, or PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: see docs/scaling.md)") from e
