"""Runs longer than a Slurm partition's time limit: the sbatch script asks for SIGUSR1 before the limit, its trap asks
the ranks to stop (a stop file), a GRPO stage checkpoints at the next step boundary and exits with the requeue code,
the script requeues the job, and the rerun resumes from that checkpoint to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.launch.commands import entry_args
from flows.launch.slurm import PREEMPTED_FILE, STOP_FILE, slurm_script
from flows.launch.spec import REPO_ROOT, LaunchSpec
from grpo.preemption import REQUEUE_EXIT
from stages.core.recipe import RecipeError, load_recipe, slurm_seconds
from tests.conftest import MINI


def test_time_limits_are_parsed_the_slurm_way_and_bad_ones_refused():
    assert [slurm_seconds(t) for t in ("90", "10:30", "24:00:00", "2-00", "1-02:03", "1-02:03:04")] == \
        [5400, 630, 86400, 172800, 93780, 93784]
    with pytest.raises(RecipeError, match=r"cluster\.time_limit: time limit '1:2:3:4' is not a Slurm time"):
        load_recipe("tiny", {"cluster.time_limit": "1:2:3:4"})
    with pytest.raises(RecipeError, match=r"checkpoint_before_limit=300 s leaves no time to train within "
                                          r"time_limit=5 \(300 s\)"):
        load_recipe("tiny", {"cluster.time_limit": "5"})
    with pytest.raises(ValueError, match="not a Slurm time"):
        LaunchSpec(target="slurm", time_limit="tomorrow")
    spec = LaunchSpec.from_cluster(load_recipe("tiny", {"cluster.launcher": "slurm", "cluster.time_limit": "4:00:00",
                                                        "cluster.checkpoint_before_limit": 600}).cluster)
    assert (spec.time_limit, spec.checkpoint_before_limit) == ("4:00:00", 600)


def test_slurm_script_requeues_and_forwards_the_signal(tmp_path):
    spec = LaunchSpec(target="slurm", nodes=2, nproc_per_node=8, workdir=str(tmp_path), time_limit="2-00:00:00",
                      checkpoint_before_limit=420)
    args = entry_args("reasoning_rl", "tiny", {}, None, tmp_path / "result.json")
    script = slurm_script(spec, SimpleNamespace(nodes=2, gpus_per_node=8), args)
    lines = script.splitlines()
    for line in ["#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@420",
                 "#SBATCH --open-mode=append", f"export R1_STOP_FILE={tmp_path / STOP_FILE}",
                 f"export R1_PREEMPTED_FILE={tmp_path / PREEMPTED_FILE}", "step=$!",
                 '    scontrol requeue "$SLURM_JOB_ID"']:
        assert line in lines, line
    trap = next(ln for ln in lines if ln.startswith("trap "))
    assert trap.endswith(" USR1") and 'touch "$R1_STOP_FILE"' in trap
    srun = next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    assert lines.index(trap) < srun  # the trap is set before the job step starts
    background = next(i for i, ln in enumerate(lines) if ln.endswith(" &"))  # srun in the background: traps run
    assert srun < background and all(ln.endswith(" \\") for ln in lines[srun:background])
    assert script.replace("\\\n    ", "").count("stages.entry reasoning_rl") == 1
    # the requeue comes only after the preempted file (rank 0 writes it once the checkpoint is complete)
    assert lines.index('if [ -f "$R1_PREEMPTED_FILE" ]; then') < lines.index('    scontrol requeue "$SLURM_JOB_ID"')
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


# --- the batch script's mechanics, with stand-ins for srun and scontrol ----------------------------------------------

TARGET = """
import os, sys, time
from grpo import preemption

preemption.listen()
for step in range(1, int(os.environ["R1_TEST_STEPS"]) + 1):
    time.sleep(0.1)
    print(f"step {step}", flush=True)
    if preemption.stop_requested():
        preemption.record(preemption.Preempted("test", step, None))
        sys.exit(preemption.REQUEUE_EXIT)
print("done", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_batch_script(tmp_path: Path, steps: int, signal_after: str | None) -> tuple[int, list[str], Path]:
    """The generated script under bash as job 42 (srun runs its command here, scontrol logs a requeue), SIGUSR1 sent
    to the batch shell alone once `signal_after` is printed."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    calls = tmp_path / "scontrol.log"
    fakes = {"srun": '#!/bin/bash\nshift\nexec "$@"\n',
             "scontrol": f'#!/bin/bash\nif [ "$1" = requeue ]; then echo "$@" >> {calls}; else echo 127.0.0.1; fi\n'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    (tmp_path / "requeue_target.py").write_text(TARGET)
    spec = LaunchSpec(target="slurm", module="requeue_target", workdir=str(work), master_port=free_port(),
                      env={"PYTHONPATH": f"{tmp_path}:{REPO_ROOT}", "R1_TEST_STEPS": str(steps),
                           "OMP_NUM_THREADS": "1"})
    script = work / "job.sbatch"
    script.write_text(slurm_script(spec, SimpleNamespace(nodes=1, gpus_per_node=0), []))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    out = []
    for line in proc.stdout:
        out.append(line.rstrip("\n"))
        if signal_after and line.strip().endswith(signal_after):
            proc.send_signal(signal.SIGUSR1)  # the batch shell only, as --signal=B: does
            signal_after = None
    proc.wait(timeout=300)
    requeues = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, out + [f"scontrol {c}" for c in requeues], work


def test_batch_script_traps_the_signal_and_requeues_once_the_stage_stopped(tmp_path):
    code, out, work = run_batch_script(tmp_path, steps=300, signal_after="step 3")
    assert code == 0, "\n".join(out)
    assert any("time limit near (SIGUSR1)" in ln for ln in out)
    stopped = json.loads((work / PREEMPTED_FILE).read_text())
    assert 3 <= stopped["step"] < 300 and not any(ln.endswith("done") for ln in out)  # stopped at a step boundary soon after the signal
    assert out[-1] == "scontrol requeue 42" and sum("requeue" in ln for ln in out if ln.startswith("scontrol")) == 1
    assert not (work / STOP_FILE).exists()  # the requeued job starts without a stop request


def test_batch_script_without_the_signal_does_not_requeue(tmp_path):
    code, out, work = run_batch_script(tmp_path, steps=2, signal_after=None)
    assert code == 0 and out[-1].endswith("done") and not any(ln.startswith("scontrol") for ln in out), "\n".join(out)
    assert not (work / PREEMPTED_FILE).exists()


# --- a GRPO stage stopped by SIGUSR1, then rerun -----------------------------------------------------------------------


def stage_overrides(root: Path) -> dict:
    return {**MINI, "tracking.uri": f"sqlite:///{root}/mlflow.db", "output_dir": str(root / "runs"),
            "r1_zero.grpo.prompts_per_step": 4, "r1_zero.grpo.num_generations": 2,
            "r1_zero.grpo.steps_per_iteration": 4, "r1_zero.grpo.checkpoint_every": 4,
            "r1_zero.grpo.log_every": 1, "r1_zero.grpo.max_completion_length": 12, "r1_zero.data.num_prompts": 16,
            "r1_zero.samples_to_log": 0, "eval.num_prompts": 4}


def entry(root: Path, model: str) -> subprocess.Popen:
    """`python -m stages.entry r1_zero` as a launcher runs it, with the preempted file the batch script would name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "R1_PREEMPTED_FILE": str(root / PREEMPTED_FILE)}
    args = ["-m", "stages.entry", "r1_zero", "--recipe", "tiny", "--overrides", json.dumps(stage_overrides(root)),
            "--inputs", json.dumps({"model": model})]
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def final_weights(root: Path) -> dict:
    from safetensors.torch import load_file

    (folder,) = (root / "runs" / "r1_zero").glob("*/model")
    return load_file(next(folder.glob("*.safetensors")))


def test_sigusr1_checkpoints_exits_for_requeue_and_the_rerun_resumes(mini_base, tmp_path):
    stopped, ref = tmp_path / "stopped", tmp_path / "ref"
    reference = entry(ref, mini_base)  # uninterrupted, meanwhile
    proc = entry(stopped, mini_base)
    deadline = time.monotonic() + 300
    while not list((stopped / "runs" / "r1_zero").glob("*/.lock")):  # the stage's run is open: its handler is set
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT, err[-3000:]
    record = json.loads((stopped / PREEMPTED_FILE).read_text())
    step = record["step"]
    assert 1 <= step < 4 and record["loop"] == "GRPO" and "stopped on request after step" in err
    assert Path(record["checkpoint"]).name == f"checkpoint-{step}"
    assert json.loads((Path(record["checkpoint"]) / "trainer_state.json").read_text())["global_step"] == step
    assert not list((stopped / "runs" / "r1_zero").glob("*/model"))  # stopped before the stage's end

    rerun = entry(stopped, mini_base)  # what the requeued job runs: the same command
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resuming from {record['checkpoint']}" in err
    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err[-3000:]
    a, b = final_weights(stopped), final_weights(ref)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # as if it had never stopped


# --- the SFT loop, and ranks that see the request at different moments -------------------------------------------------


def test_sft_stops_at_the_step_boundary_and_resumes_exactly(tiny_model, tok, tmp_path, monkeypatch):
    """The stop file (what the batch script's trap writes): the SFT loop checkpoints the step it just finished, raises
    Preempted, and a resumed run ends with the weights of an uninterrupted one."""
    import torch

    from grpo.preemption import STOP_FILE_ENV, Preempted
    from stages.core.sft import SFTConfig, SFTTrainer
    from stages.core.tasks import clean_trace, make_problems

    data = [{"prompt": f"User: {p.question}\nAssistant:", "completion": " " + clean_trace(p)}
            for p in make_problems("addition", 40, seed=2)]
    cfg = SFTConfig(max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1, checkpoint_every=3)
    arch = {"num_attention_heads": 2, "num_key_value_heads": 1}
    straight = tiny_model(tok, **arch)
    SFTTrainer(straight, tok, data, cfg, progress=False).train()

    stop = tmp_path / "stop-requested"
    stop.touch()
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    with pytest.raises(Preempted, match="SFT stopped on request after step 1") as info:
        SFTTrainer(tiny_model(tok, **arch), tok, data, cfg, output_dir=tmp_path / "ckpt", progress=False).train()
    assert info.value.checkpoint == tmp_path / "ckpt" / "checkpoint-1"  # not due (every 3): written for the stop
    assert json.loads((info.value.checkpoint / "trainer_state.json").read_text())["step"] == 1
    stop.unlink()  # the requeued job starts without it
    resumed = tiny_model(tok, seed=99, **arch)
    res = SFTTrainer(resumed, tok, data, cfg, output_dir=tmp_path / "ckpt", progress=False).train(resume_from="latest")
    assert res.steps == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def _rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from grpo import preemption

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    preemption.listen()
    before = preemption.stop_requested()
    if rank == 1:  # only rank 1 gets the signal
        os.kill(os.getpid(), signal.SIGUSR1)
    after = preemption.stop_requested()
    Path(out, f"rank{rank}.json").write_text(json.dumps([before, after, preemption.requested_here()]))
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_request_only_one_of_them_got():
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(f"file://{out}/store", out), nprocs=2, join=True)
        seen = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen == [[False, True, False], [False, True, True]]  # rank 0 stops too, though it got nothing itself
