"""What to run and where: the launch target's settings, and the recipe the launched stage reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages.core.recipe import Recipe, load_recipe, slurm_seconds

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA_DIR = REPO_ROOT / "infra"
RESULT_FILE = "result.json"
Target = Literal["local", "torchrun", "deepspeed", "slurm", "kubernetes"]


class LaunchError(RuntimeError):
    """A launched stage failed; the message holds the failing rank's error (traceback tail)."""


class LaunchSpec(BaseModel):
    """How to run one stage. `from_cluster` builds it from a recipe's `cluster` section."""

    model_config = ConfigDict(extra="forbid")

    target: Target = "local"
    nproc_per_node: int = Field(1, ge=1, description="processes per node (= GPUs per node on GPU machines)")
    nodes: int = Field(1, ge=1)
    hostfile: str | None = Field(None, description="deepspeed: MPI-style hostfile (`worker-0 slots=8`), one line a node")
    master_addr: str | None = Field(None, description="deepspeed: address of the rank-0 node (default: first host)")
    master_port: int | None = Field(None, ge=1, le=65535,
                                    description="rendezvous port; None: torchrun --standalone picks a free one, "
                                                "deepspeed and slurm use 29500")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the launched processes")
    module: str = Field("stages.entry", description="module run with -m (tests launch their own)")
    timeout: float | None = Field(None, gt=0, description="seconds before the launch is killed; None = no limit")
    workdir: str | None = Field(None, description="result file, logs, scripts; default <recipe.output_dir>/launch/...")
    # slurm
    job_name: str | None = Field(None, description="slurm job / k8s job name (default r1-<stage>)")
    time_limit: str = Field("24:00:00", description="slurm --time")
    checkpoint_before_limit: int = Field(300, ge=30, description="slurm: seconds before the time limit at which the "
                                         "stage checkpoints and the job is requeued")
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = Field(None, ge=1)
    setup: list[str] | None = Field(None, description="slurm: shell lines run before srun (default: this venv on PATH)")
    # kubernetes
    deployment: str = Field("r1-stage/r1-stage-k8s", description="flow/deployment name on the Kubernetes work pool")
    image: str | None = None
    cpu: str | None = None
    memory: str | None = None
    namespace: str | None = None

    @field_validator("time_limit")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        slurm_seconds(value)
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.nodes > 1 and self.target in ("local", "torchrun", "kubernetes"):
            raise ValueError(f"nodes={self.nodes} needs target deepspeed or slurm (got {self.target})")
        if self.target == "deepspeed" and self.nodes > 1 and not self.hostfile:
            raise ValueError("deepspeed on several nodes needs a hostfile")
        return self

    @classmethod
    def from_cluster(cls, cluster: Any, **kw) -> LaunchSpec:
        """From a recipe's ClusterConfig: launcher -> target, nodes, nproc_per_node (default gpus_per_node; CPU: 1).

        Any other LaunchSpec field the cluster section has (hostfile, master_port, env, partition, image, ...) is taken
        too, so new recipe fields need no change here; `kw` wins over both.
        """
        nproc = getattr(cluster, "nproc_per_node", None) or max(cluster.gpus_per_node, 1)
        base: dict[str, Any] = {"target": cluster.launcher, "nodes": cluster.nodes, "nproc_per_node": nproc}
        for name in cls.model_fields:
            value = getattr(cluster, name, None)
            if name not in base and value is not None:
                base[name] = value
        return cls(**{**base, **kw})


def recipe_obj(recipe: Any, overrides: dict | None):
    """The validated Recipe: from a preset name or YAML path, or a Recipe (or its dict) with `overrides` applied."""
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    if isinstance(recipe, dict):
        recipe = Recipe.model_validate(recipe)
    if overrides:
        data = recipe.model_dump(mode="json")
        for key, value in overrides.items():
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        recipe = Recipe.model_validate(data)
    return recipe


def dump_recipe(cfg, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
