"""The stage launcher (flows/launch/): real 2-process torchrun launches of tests/launch_targets.py on CPU (gloo), the
in-process target, and the generated DeepSpeed command, Slurm script and Kubernetes job configuration."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
from types import SimpleNamespace

import pytest

from flows.launch import LaunchError, LaunchSpec, launch_stage, slurm, supervise
from flows.launch import stage as stage_launch
from flows.launch.commands import deepspeed_command, entry_args, torchrun_command
from flows.launch.kubernetes import K8S_TEMPLATE, fill_k8s_template, k8s_job_variables
from flows.launch.pod import r1_stage
from flows.launch.slurm import slurm_script
from flows.launch.spec import recipe_obj
from tests.launch_targets import FAIL_MESSAGE

os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_spec(tmp_path, **kw) -> LaunchSpec:
    kw.setdefault("master_port", free_port())
    return LaunchSpec(target="torchrun", nproc_per_node=2, module="tests.launch_targets",
                      workdir=str(tmp_path / "launch"), timeout=180, env={"OMP_NUM_THREADS": "1"}, **kw)


# --- torchrun: real launches ----------------------------------------------------------------------------------------


def test_torchrun_two_ranks_return_rank0_result(tmp_path):
    lines: list[str] = []
    spec = torchrun_spec(tmp_path, master_port=None)  # --standalone: torchrun picks the port
    spec.env["R1_TEST_ENV"] = "from-spec"
    out = launch_stage("ok", "tiny", {"eval.num_prompts": 4}, "parent123", spec, log=lines.append)
    assert out["sum"] == 3.0 and out["world_size"] == 2  # (0 + 1) + (1 + 1): both ranks took part
    assert out["stage"] == "ok" and out["recipe"] == "tiny" and out["parent_run_id"] == "parent123"
    assert out["overrides"] == {"eval.num_prompts": 4} and out["env"] == "from-spec"
    streamed = "\n".join(lines)
    assert "rank 0/2: all_reduce sum 3.0" in streamed and "rank 1/2: all_reduce sum 3.0" in streamed
    assert lines[0].startswith("$ ") and "torch.distributed.run" in lines[0] and "--standalone" in lines[0]


def test_torchrun_rank1_failure_raises_with_its_error(tmp_path):
    with pytest.raises(LaunchError) as e:
        launch_stage("fail", "tiny", None, None, torchrun_spec(tmp_path), log=lambda line: None)
    msg = str(e.value)
    assert FAIL_MESSAGE in msg and "rank 1" in msg and "RuntimeError" in msg
    assert "launch_targets.py" in msg  # the traceback tail, not only the last line
    # rank 0, stuck in a barrier, is terminated or fails with "Connection closed by peer": never reported first
    assert msg.index("rank 1 error") < msg.index(FAIL_MESSAGE)
    assert "rank 0 error" not in msg or msg.index("rank 0 error") > msg.index(FAIL_MESSAGE)


def test_a_victim_named_root_cause_is_reported_after_the_real_error(tmp_path):
    """When both ranks exit within one monitoring interval torchrun may name the victim rank 0 as the root cause."""
    attempt = tmp_path / "none_x" / "attempt_0"
    for rank, err in ((0, "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1"),
                      (1, f"RuntimeError: {FAIL_MESSAGE}")):
        (attempt / str(rank)).mkdir(parents=True)
        (attempt / str(rank) / "stderr.log").write_text(
            f"[rank{rank}]: Traceback (most recent call last):\n[rank{rank}]:   File \"s.py\", line 1\n[rank{rank}]: {err}\n")
    summary = ("Failures:\n[1]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 2)\n"
               "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 1)")
    msg = supervise.torchrun_failure("s", 1, summary.splitlines(), tmp_path)
    assert msg.index(FAIL_MESSAGE) < msg.index("Connection closed by peer")
    assert msg.splitlines()[1] == "rank 1 error:"


def test_error_json_written_by_record_is_read(tmp_path):
    """Ranks under torch.distributed.elastic's @record leave error.json; it is preferred to the stderr log."""
    rank_dir = tmp_path / "none_abc" / "attempt_0" / "1"
    rank_dir.mkdir(parents=True)
    stack = f'Traceback (most recent call last):\n  File "x.py", line 3, in f\n    boom()\nValueError: {FAIL_MESSAGE}\n'
    (rank_dir / "error.json").write_text(json.dumps(
        {"message": {"message": f"ValueError: {FAIL_MESSAGE}", "extraInfo": {"py_callstack": stack, "timestamp": "1"}}}))
    (rank_dir / "stderr.log").write_text("[rank1]: unrelated\n")
    summary = "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1"
    msg = supervise.torchrun_failure("s", 1, summary.splitlines(), tmp_path)
    assert f"ValueError: {FAIL_MESSAGE}" in msg and 'File "x.py"' in msg and "rank 1" in msg


def test_timeout_kills_the_launch_and_cancels_a_slurm_job(monkeypatch):
    spec = LaunchSpec(target="torchrun", timeout=1)
    aborted = []
    with pytest.raises(LaunchError, match="timed out"):
        supervise.stream(["bash", "-c", "echo 4242; exec sleep 30"], spec, log=lambda line: None, on_abort=aborted.append)
    assert aborted == [["4242"]]
    ran = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    slurm.scancel(["4242"])  # what a slurm launch does on abort: the first line of `sbatch --parsable` is the job id
    assert ran == [["scancel", "4242"]]


# --- local: in-process ----------------------------------------------------------------------------------------------


def test_local_runs_the_registry_stage_in_process(monkeypatch, tmp_path):
    calls = []

    def fake_stage(recipe, inputs=None, parent_run_id=None, progress=True):
        calls.append((recipe, inputs, parent_run_id, progress, os.getpid()))
        return {"run_id": "r1", "model": "runs:/r1/model"}

    monkeypatch.setattr("flows.launch.stage.runnable", lambda: {"base_model": fake_stage})
    out = launch_stage("base_model", "tiny", {"eval.num_prompts": 3}, "p1", LaunchSpec(target="local"),
                       inputs={"model": "runs:/up/model"})
    assert out == {"run_id": "r1", "model": "runs:/r1/model"}
    recipe, inputs, parent, progress, pid = calls[0]
    # in-process stages report progress (bars on a terminal, step lines otherwise)
    assert recipe.eval.num_prompts == 3 and recipe.name == "tiny" and parent == "p1" and progress
    assert inputs == {"model": "runs:/up/model"}
    assert pid == os.getpid()
    with pytest.raises(LaunchError, match="not runnable"):
        launch_stage("r1_zero", "tiny", None, None, LaunchSpec(target="local"))


def test_local_accepts_a_validated_recipe(monkeypatch):
    from stages.core.recipe import load_recipe

    seen = []
    monkeypatch.setattr("flows.launch.stage.runnable",
                        lambda: {"base_model": lambda r, inputs=None, parent_run_id=None, progress=True: seen.append(r) or {}})
    launch_stage("base_model", load_recipe("tiny"), {"seed": 7}, None, LaunchSpec())
    assert seen[0].seed == 7


# --- spec -----------------------------------------------------------------------------------------------------------


def test_spec_from_cluster_and_validation():
    from stages.core.recipe import load_recipe

    spec = LaunchSpec.from_cluster(load_recipe("qwen2.5-7b").cluster, hostfile="/etc/hostfile")
    assert (spec.target, spec.nodes, spec.nproc_per_node) == ("deepspeed", 4, 8)
    assert LaunchSpec.from_cluster(load_recipe("tiny").cluster).nproc_per_node == 1
    # launcher fields a recipe's cluster section may grow are picked up by name
    more = SimpleNamespace(launcher="slurm", nodes=2, gpus_per_node=8, partition="gpu", master_port=29123,
                           hostfile=None, deepspeed_config="infra/deepspeed/zero3.json")
    spec = LaunchSpec.from_cluster(more, time_limit="1:00:00")
    assert (spec.partition, spec.master_port, spec.time_limit, spec.hostfile) == ("gpu", 29123, "1:00:00", None)
    with pytest.raises(ValueError, match="nodes=2"):
        LaunchSpec(target="torchrun", nodes=2)
    with pytest.raises(ValueError, match="hostfile"):
        LaunchSpec(target="deepspeed", nodes=2)


def test_torchrun_command_fields():
    cmd = torchrun_command(LaunchSpec(target="torchrun", nproc_per_node=4, master_port=29999),
                                  ["base_model", "--recipe", "tiny"], log_dir="/tmp/logs")
    s = shlex.join(cmd)
    assert "-m torch.distributed.run" in s and "--nproc-per-node 4" in s and "--master-port 29999" in s
    assert "--log-dir /tmp/logs --tee 3" in s and s.endswith("-m stages.entry base_model --recipe tiny")


# --- deepspeed: the command only (no GPUs here) ---------------------------------------------------------------------


def test_deepspeed_command():
    args = entry_args("r1_zero", "qwen2.5-7b", {"seed": 1}, "pid", "/shared/result.json")
    spec = LaunchSpec(target="deepspeed", nodes=4, nproc_per_node=8, hostfile="/shared/hostfile", master_port=29600)
    cmd = deepspeed_command(spec, args)
    assert os.path.basename(cmd[0]) == "deepspeed"
    opts = cmd[1:cmd.index("--module") + 2]
    assert opts[opts.index("--hostfile") + 1] == "/shared/hostfile"
    assert opts[opts.index("--num_nodes") + 1] == "4" and opts[opts.index("--num_gpus") + 1] == "8"
    assert opts[opts.index("--master_port") + 1] == "29600" and "--no_local_rank" in opts
    assert cmd[cmd.index("--module") + 1] == "stages.entry"
    assert cmd[cmd.index("--module") + 2:] == args
    assert json.loads(args[args.index("--overrides") + 1]) == {"seed": 1}
    # the DeepSpeed launcher itself accepts the command line
    from deepspeed.launcher.runner import parse_args

    parsed = parse_args(cmd[1:])
    assert parsed.module and parsed.no_local_rank and parsed.num_nodes == 4 and parsed.user_script == "stages.entry"
    assert parsed.user_args == args and parsed.num_gpus == 8
    single = deepspeed_command(LaunchSpec(target="deepspeed", nproc_per_node=2), args)
    assert "--hostfile" not in single and "--num_nodes" not in single


# --- slurm: the script's fields, bash -n, and a run through stand-ins for sbatch/srun/scontrol -----------------------


def test_slurm_script_fields(tmp_path):
    cluster = SimpleNamespace(nodes=4, gpus_per_node=8)
    spec = LaunchSpec(target="slurm", nodes=4, nproc_per_node=8, workdir=str(tmp_path), partition="gpu",
                      time_limit="12:00:00", master_port=29700, env={"NCCL_DEBUG": "WARN"})
    args = entry_args("reasoning_rl", "my recipe.yaml", {"seed": 2}, "pid", tmp_path / "result.json")
    script = slurm_script(spec, cluster, args)
    for line in ["#!/bin/bash", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --job-name=r1-reasoning_rl", f"#SBATCH --output={tmp_path}/slurm-%j.out",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "export MASTER_PORT=29700",
                 "export NCCL_DEBUG=WARN"]:
        assert line in script.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    flat = script.replace("\\\n    ", "")
    assert 'srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node 8' in flat
    assert '--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --log-dir' in flat
    assert "-m stages.entry reasoning_rl --recipe" in flat
    assert "'my recipe.yaml'" in flat  # arguments are shell-quoted
    assert f"--log-dir {tmp_path}/torchrun-logs --tee 3 -m stages.entry" in flat
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_slurm_failure_names_the_node_and_rank(tmp_path):
    """Every node's torchrun logs under <workdir>/torchrun-logs/<run>: the real error is found on whichever node."""
    for run, rank, err in (("42_node0", 0, "RuntimeError: Connection closed by peer [10.0.0.2]:5"),
                           ("42_node1", 1, f"RuntimeError: {FAIL_MESSAGE}")):
        d = tmp_path / run / "attempt_0" / str(rank)
        d.mkdir(parents=True)
        (d / "stderr.log").write_text(f"Traceback (most recent call last):\n  File \"s.py\", line 1\n{err}\n")
    msg = supervise.torchrun_failure("s", 1, ["42", "srun: error: node1: task 1: Exited with exit code 1"], tmp_path,
                                   "slurm")
    assert msg.startswith("stage s failed under slurm (exit 1)")
    assert msg.splitlines()[1] == "local rank 1 of 42_node1 error:" and FAIL_MESSAGE in msg


FAKE_SBATCH = """#!/bin/bash
# stand-in for `sbatch --wait --parsable SCRIPT`: run SCRIPT on this host as a 1-node job 42, output where it asks
script="${@: -1}"
out=$(sed -n 's/^#SBATCH --output=//p' "$script" | sed 's/%j/42/')
echo 42
SLURM_JOB_ID=42 SLURM_NNODES=1 SLURM_JOB_NODELIST=localhost bash "$script" > "$out" 2>&1
"""


def test_slurm_launch_through_stand_ins(tmp_path, monkeypatch):
    """The generated script runs as written (srun torchrun, c10d rendezvous) when sbatch/srun/scontrol are faked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": FAKE_SBATCH, "srun": '#!/bin/bash\nshift\nexec "$@"\n',
                       "scontrol": "#!/bin/bash\necho 127.0.0.1\n"}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cluster = SimpleNamespace(nodes=1, gpus_per_node=0)
    spec = LaunchSpec(target="slurm", nproc_per_node=2, master_port=free_port(), module="tests.launch_targets",
                      workdir=str(tmp_path / "launch"), timeout=180, env={"OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    out = launch_stage("ok", "tiny", None, None, spec, log=lines.append, cluster=cluster)
    assert out["sum"] == 3.0 and out["world_size"] == 2
    assert any("all_reduce sum 3.0" in ln for ln in lines)  # the job's output file was followed


# --- kubernetes: the work-pool template and the deployment run ------------------------------------------------------


def test_k8s_template_is_a_valid_prefect_base_job_template():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import find_placeholders

    template = json.loads(K8S_TEMPLATE.read_text())
    WorkPoolCreate(name="r1-k8s", type="kubernetes", base_job_template=template)  # Prefect's own validation
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    props = template["variables"]["properties"]
    assert used <= set(props), used - set(props)
    assert {"image", "gpus", "cpu", "memory", "namespace", "env"} <= used
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert manifest["kind"] == "Job" and manifest["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_k8s_template_filled_with_job_variables():
    spec = LaunchSpec(target="kubernetes", nproc_per_node=4, image="reg/r1:1", memory="200Gi", namespace="ml",
                      env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    values = k8s_job_variables(spec)
    assert values == {"gpus": 4, "image": "reg/r1:1", "memory": "200Gi", "namespace": "ml",
                      "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}
    cfg = fill_k8s_template(values)
    pod = cfg["job_manifest"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "reg/r1:1" and c["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert c["resources"]["requests"]["memory"] == "200Gi" and c["resources"]["requests"]["cpu"] == "32"
    assert c["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert cfg["namespace"] == "ml" and cfg["job_manifest"]["metadata"]["namespace"] == "ml"
    assert "{{" not in json.dumps(cfg)


def test_kubernetes_target_runs_the_stage_deployment(monkeypatch):
    calls = {}

    class Completed:
        def is_completed(self):
            return True

        def result(self):
            return {"run_id": "k8s-run"}

    def fake_run_deployment(name, parameters, job_variables, timeout):
        calls.update(name=name, parameters=parameters, job_variables=job_variables)
        return SimpleNamespace(state=Completed(), name="fr", id="1")

    monkeypatch.setattr("prefect.deployments.run_deployment", fake_run_deployment)
    spec = LaunchSpec(target="kubernetes", nproc_per_node=8, image="reg/r1:1")
    out = launch_stage("r1_zero", "qwen2.5-7b", {"seed": 3}, "pid", spec, log=lambda line: None)
    assert out == {"run_id": "k8s-run"}
    assert calls["name"] == "r1-stage/r1-stage-k8s" and calls["job_variables"] == {"gpus": 8, "image": "reg/r1:1"}
    p = calls["parameters"]
    assert (p["stage"], p["recipe"], p["overrides"], p["parent_run_id"]) == ("r1_zero", "qwen2.5-7b", {"seed": 3}, "pid")
    inner = LaunchSpec.model_validate(p["launch"])  # inside the pod: torchrun over its 8 GPUs
    assert inner.target == "torchrun" and inner.nproc_per_node == 8


def test_stage_flow_parameters_accept_a_launch_spec():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(r1_stage.fn)
    assert {"stage", "recipe", "overrides", "parent_run_id", "inputs", "launch"} <= set(schema.properties)


def test_kubernetes_launch_hands_the_planned_inputs_to_the_stage_in_the_pod(monkeypatch):
    """What the pipeline's stage task passes (a Recipe, planned input URIs, the parent run) reaches the stage the pod
    runs: the deployment's parameters, validated the way Prefect validates them, into r1_stage and its local launch."""
    from stages.core.recipe import load_recipe

    planned = {"model": "runs:/0123abcd/model", "data": "runs:/4567ef01/cot_data"}
    sent, ran = {}, {}

    class Completed:
        def is_completed(self):
            return True

        def result(self):
            return sent["out"]

    def fake_run_deployment(name, parameters, job_variables, timeout):  # the worker starts the pod; the pod runs:
        sent.update(parameters=parameters, out=r1_stage.fn(**r1_stage.validate_parameters(parameters)))
        return SimpleNamespace(state=Completed(), name="fr", id="1")

    def fake_run_local(stage, recipe, overrides, parent_run_id, inputs=None):
        ran.update(stage=stage, seed=recipe_obj(recipe, overrides).seed, parent=parent_run_id, inputs=inputs)
        return {"run_id": "pod-run"}

    monkeypatch.setattr("prefect.deployments.run_deployment", fake_run_deployment)
    monkeypatch.setattr(stage_launch, "run_local", fake_run_local)
    spec = LaunchSpec(target="kubernetes", nproc_per_node=1, image="reg/r1:1")
    out = launch_stage("cold_start_sft", load_recipe("tiny", {"seed": 7}), None, "pid", spec, log=lambda line: None,
                       inputs=planned)
    assert out == {"run_id": "pod-run"}
    assert sent["parameters"]["inputs"] == planned
    assert ran == {"stage": "cold_start_sft", "seed": 7, "parent": "pid", "inputs": planned}



def test_deepspeed_launch_passes_a_recipe_object_as_a_file_and_reports_the_traceback(tmp_path, monkeypatch):
    from stages.core.recipe import load_recipe

    seen = {}

    def fake_stream(cmd, spec, log, **kw):
        seen["cmd"] = cmd
        return 1, ["[INFO] spawned", "Traceback (most recent call last):", '  File "s.py", line 1', "ValueError: boom",
                   "[INFO] Process 1 exits with return code = 1"]

    monkeypatch.setattr(stage_launch, "stream", fake_stream)
    spec = LaunchSpec(target="deepspeed", nproc_per_node=2, workdir=str(tmp_path))
    with pytest.raises(LaunchError, match="ValueError: boom") as e:
        launch_stage("base_model", load_recipe("tiny", {"seed": 5}), {"seed": 5}, "p", spec, log=lambda line: None)
    assert "return code" not in str(e.value)
    cmd = seen["cmd"]
    recipe_file = cmd[cmd.index("--recipe") + 1]
    assert recipe_file == str(tmp_path / "recipe.yaml") and load_recipe(recipe_file).seed == 5
    assert json.loads(cmd[cmd.index("--overrides") + 1]) == {}
