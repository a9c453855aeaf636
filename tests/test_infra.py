"""infra/: the DeepSpeed configs (keys, stages, a 2-process ZeRO-2 step on CPU) and the server compose file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from flows.launch import LaunchSpec, launch_stage
from flows.launch.spec import INFRA_DIR

DS_DIR = INFRA_DIR / "deepspeed"
CONFIGS = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
# filled in by our training loops at runtime (infra/deepspeed/README.md): present so each file is complete on its own
RUNTIME_KEYS = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16"}


@pytest.mark.parametrize("name,stage", CONFIGS.items())
def test_deepspeed_config_keys(name, stage):
    cfg = json.loads((DS_DIR / name).read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    assert RUNTIME_KEYS <= set(cfg) and "train_batch_size" not in cfg  # derived by DeepSpeed from the two above
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}  # valid on CPU; GPU loops set bf16
    text = json.dumps(cfg)
    assert '"auto"' not in text  # our own loops, not the HF Trainer: no "auto" values
    zero = cfg["zero_optimization"]
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_pretrained needs whole weights
    offload = name == "zero3_offload.json"
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
        assert cfg["optimizer"]["type"] == "AdamW"  # ZeRO-Offload wants DeepSpeed's CPU Adam, built from this section
    else:
        assert "optimizer" not in cfg  # the loop passes its own torch optimizer


@pytest.mark.parametrize("name", CONFIGS)
def test_deepspeed_config_is_accepted_by_deepspeed(name, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = json.loads((DS_DIR / name).read_text())
    ds = DeepSpeedConfig(cfg)  # no process group: world size 1
    assert ds.zero_optimization_stage == CONFIGS[name]
    assert ds.train_batch_size == 1  # derived: micro batch 1 x accumulation 1 x 1 rank


def test_deepspeed_readme_lists_the_runtime_keys():
    readme = (DS_DIR / "README.md").read_text()
    for key in RUNTIME_KEYS | {"train_batch_size", "gradient_clipping", "optimizer.params.lr"}:
        assert f"`{key}" in readme, key


@pytest.mark.slow
def test_zero2_step_on_two_cpu_ranks(tmp_path):
    """deepspeed.initialize with zero2.json and one optimizer step, 2 processes under torchrun, gloo on CPU."""
    spec = LaunchSpec(target="torchrun", nproc_per_node=2, module="tests.launch_targets", workdir=str(tmp_path),
                      timeout=300, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                        "R1_TEST_DS_CONFIG": str(DS_DIR / "zero2.json")})
    from tests.test_launch import free_port

    spec.master_port = free_port()
    out = launch_stage("zero2", "tiny", None, None, spec, log=lambda line: None)
    assert out["zero_stage"] == 2 and out["world_size"] == 2 and out["loss"] > 0


# --- compose ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA_DIR / "compose.yaml").read_text())


def test_compose_services(compose):
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket", "prefect", "mlflow"} <= set(services)
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) > 1, name


def test_compose_ports_bound_to_localhost(compose):
    published = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            published += 1
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert spec.startswith("127.0.0.1:"), (name, port)
    assert published >= 4


def test_compose_depends_on_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in services
            expected = "service_completed_successfully" if dep == "create-bucket" else "service_healthy"
            assert cond["condition"] == expected, (name, dep)
    assert services["prefect"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "minio", "create-bucket"}


def test_compose_servers_use_postgres_and_s3(compose):
    s = compose["services"]
    mlflow_cmd = " ".join(s["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow_cmd and "--artifacts-destination=s3://" in mlflow_cmd
    assert s["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert s["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert (INFRA_DIR / "mlflow" / "Dockerfile").exists()


def test_compose_secrets_come_from_env_file(compose):
    text = (INFRA_DIR / "compose.yaml").read_text()
    example = dict(line.split("=", 1) for line in (INFRA_DIR / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(example), used - set(example)
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"} <= used
    for name, svc in compose["services"].items():
        for key, value in svc.get("environment", {}).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert str(value).startswith("${"), f"{name}.{key} is not read from infra/.env"
    assert "${POSTGRES_PASSWORD}@postgres" in " ".join(compose["services"]["mlflow"]["command"])
    assert ".env" in (INFRA_DIR / ".gitignore").read_text().split()


def test_compose_paths_exist(compose):
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (INFRA_DIR / src).exists(), src
        if isinstance(svc.get("build"), str):
            assert (INFRA_DIR / svc["build"] / "Dockerfile").exists()


def test_docs_scaling_mentions_every_target():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    for word in ("cluster.launcher", "gpus_per_node", "deepspeed_config", "torchrun", "deepspeed --hostfile",
                 "sbatch", "prefect work-pool create --type kubernetes", "docker compose", "launch_stage"):
        assert word in doc, word


def test_offload_config_gets_deepspeeds_optimizer_with_the_stage_settings(monkeypatch):
    """ZeRO-Offload refuses a torch optimizer: with zero3_offload.json the loop passes none, DeepSpeed builds AdamW from
    the config's section, which carries the stage's lr/betas/weight decay, and the LR schedule is built on it."""
    import torch

    from grpo import training
    from grpo.config import GRPOConfig

    seen = {}

    class FakeDeepSpeedEngine:
        def __init__(self, model, optimizer, scheduler, max_grad_norm, ds_config, model_parameters=None, **batching):
            seen.update(optimizer=optimizer, scheduler=scheduler, ds=ds_config, params=model_parameters)

    monkeypatch.setattr(training, "DeepSpeedEngine", FakeDeepSpeedEngine)
    cfg = GRPOConfig(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.9, weight_decay=0.1, warmup_steps=1)
    model = torch.nn.Linear(2, 1)
    file = json.loads((DS_DIR / "zero3_offload.json").read_text())
    training.build_engine(model, cfg, 10, file)
    assert seen["optimizer"] is None and len(seen["params"]) == 2
    assert seen["ds"]["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-8,
                                                                   "weight_decay": 0.1}}
    assert file["optimizer"]["params"]["lr"] == 1e-6  # the caller's dict is not changed
    ds_optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # what DeepSpeed hands the scheduler callable
    assert seen["scheduler"](ds_optimizer).get_last_lr() == [3e-4 / 2]  # warmup: update 0 of 1 -> half the lr

    training.build_engine(model, cfg, 10, json.loads((DS_DIR / "zero2.json").read_text()))
    assert isinstance(seen["optimizer"], torch.optim.AdamW) and "optimizer" not in seen["ds"]


def test_offload_without_a_compiler_is_refused_at_preflight(monkeypatch):
    from grpo.training import deepspeed_problems
    from stages.core.preflight import check_cluster
    from stages.core.recipe import load_recipe

    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"cpu_adam": False})
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: False)
    offload = json.loads((DS_DIR / "zero3_offload.json").read_text())
    assert deepspeed_problems(json.loads((DS_DIR / "zero3.json").read_text())) == []
    [problem] = deepspeed_problems(offload)
    assert "CPU Adam" in problem and "no ninja" in problem
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"cpu_adam": True})  # prebuilt: nothing to compile
    assert deepspeed_problems(offload) == []

    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"cpu_adam": False})
    recipe = load_recipe("tiny", {"cluster.deepspeed_config": "infra/deepspeed/zero3_offload.json"})
    expected = f"cluster.deepspeed_config: infra/deepspeed/zero3_offload.json: {problem}"
    assert check_cluster(recipe, ["r1_zero"]) == [expected]
