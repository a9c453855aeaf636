"""A checkpoint written on N ranks resumes on M (grpo.checkpoint: DeepSpeed's shards consolidated into a universal
checkpoint, the reference reassembled, each rank's RNG re-seeded from (seed, step, rank)).

2 CPU ranks under DeepSpeed ZeRO-2/3 (gloo) train GRPO and SFT for 4 steps with a checkpoint at step 2, and dump what
DeepSpeed itself holds at step 2 (each parameter's whole fp32 weights and Adam moments, gathered over the ranks). One
process then resumes each checkpoint: its weights and moments must equal those tensors exactly, its step counter and
data position continue, and, since the rollouts are scripted (no sampling), its last two steps must equal the 2-rank
run's up to float rounding. Under ZeRO-3 a 1-rank DeepSpeed run resumes too (DeepSpeed's own universal loader), and
its own checkpoint at step 3 then resumes on 2 ranks (1 -> 2).

Run as a script (by torchrun) this file is the worker: `write|resume|widen <stage> <out>`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, CUT = 4, 2


def grpo_setup(every: int = CUT):
    from tests.test_grpo_distributed import setup

    model, tok, cfg, dataset, funcs, backend = setup("token_mean")
    # 4 steps in one iteration: the cut at step 2 is mid-iteration (the reference comes from the checkpoint), and
    # 12 prompts at 4 a step cross into the second epoch of the data after the cut
    cfg = cfg.model_copy(update={"steps_per_iteration": STEPS, "checkpoint_every": every})
    return model, tok, cfg, dataset, funcs, backend


def sft_setup(every: int = CUT):
    from stages.core.sft import SFTConfig
    from stages.core.tasks import clean_trace, make_problems
    from stages.core.tokenizer import train_tokenizer
    from tests.conftest import build_tiny_model

    problems = make_problems("addition", 16, seed=3)
    examples = [{"prompt": f"User: {p.question}\nAssistant:", "completion": clean_trace(p)} for p in problems]
    tok = train_tokenizer([e["prompt"] + e["completion"] for e in examples], vocab_size=320)
    cfg = SFTConfig(batch_size=4, max_steps=STEPS, checkpoint_every=every, learning_rate=1e-2, warmup_steps=1,
                    max_length=64, log_every=1, seed=5)
    return build_tiny_model(tok), tok, examples, cfg


def ds_config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}


def consolidated(engine) -> dict[str, dict[str, torch.Tensor]]:
    """What DeepSpeed holds now, whole: each parameter's fp32 weights and Adam moments (a collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {n: {"fp32": safe_get_full_fp32_param(p).clone(),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
            for n, p in engine.module.named_parameters()}


def grpo_trainer(stage: int | None, out: Path, model=None, every: int = CUT):
    from grpo.trainer import GRPOTrainer

    fresh, tok, cfg, dataset, funcs, backend = grpo_setup(every)
    return GRPOTrainer(model if model is not None else fresh, tok, cfg, dataset, funcs, backend=backend,
                       progress=False, output_dir=out / "grpo",
                       deepspeed_config=None if stage is None else ds_config(stage))


def sft_trainer(stage: int | None, out: Path, model=None, every: int = CUT):
    from stages.core.sft import SFTTrainer

    fresh, tok, examples, cfg = sft_setup(every)
    return SFTTrainer(model if model is not None else fresh, tok, examples, cfg, output_dir=out / "sft", progress=False,
                      deepspeed_config=None if stage is None else ds_config(stage))


def write(stage: int, out: Path) -> None:
    """2 ranks: 4 steps of GRPO and SFT, checkpoints at 2 and 4; rank 0 keeps the histories and step 2's tensors."""
    import torch.distributed as dist

    grpo = grpo_trainer(stage, out)
    first = grpo.train(max_steps=CUT)
    at_cut = {"grpo": consolidated(grpo.engine)}
    history = {"grpo": first + grpo.train(), "grpo_sampler": grpo.sampler.state()}
    sft = sft_trainer(stage, out)
    sft.total_steps = CUT  # stop at the cut (its checkpoint), dump, then go on
    sft_first = sft.train().history
    at_cut["sft"] = consolidated(sft.engine)
    sft.total_steps = STEPS
    history["sft"] = sft_first + sft.train().history
    if dist.get_rank() == 0:
        torch.save(at_cut, out / "at_cut.pt")
        (out / "history.json").write_text(json.dumps(history))
    dist.barrier()


def check_resumed(loop: str, engine, at_cut: dict) -> None:
    """This engine's weights and Adam moments equal the 2-rank run's at the cut, tensor for tensor."""
    for name, p in engine.module.named_parameters():
        saved = at_cut[loop][name]
        if engine.is_deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            mine = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        else:
            mine = {"fp32": p.detach(), **{k: engine.optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq")}}
        for key, value in saved.items():
            assert torch.equal(mine[key].reshape(value.shape), value), (loop, name, key)


def resume_and_continue(stage: int | None, out: Path, cut: int = CUT, every: int = CUT) -> dict:
    """Resume both checkpoints at step `cut` on this run's ranks (from another model init) and run to step 4. At the
    2-rank run's cut, the weights and moments must be the ones it dumped there."""
    from tests.conftest import build_tiny_model

    at_cut = torch.load(out / "at_cut.pt", weights_only=True) if cut == CUT else None
    _, tok, *_ = grpo_setup()
    grpo = grpo_trainer(stage, out, model=build_tiny_model(tok, seed=9), every=every)
    grpo.resume(out / "grpo" / f"checkpoint-{cut}")
    if at_cut:
        check_resumed("grpo", grpo.engine, at_cut)
    resumed = {"grpo_step": grpo.global_step, "grpo_sampler_at_cut": grpo.sampler.state(), "lr": grpo.engine.lr(),
               "torch_seed": torch.initial_seed()}
    resumed["grpo"] = grpo.train()
    resumed["grpo_sampler"] = grpo.sampler.state()
    _, sft_tok, _, _ = sft_setup()
    sft = sft_trainer(stage, out, model=build_tiny_model(sft_tok, seed=9), every=every)
    sft.step = sft.training.resume(out / "sft" / f"checkpoint-{cut}")["step"]
    if at_cut:
        check_resumed("sft", sft.engine, at_cut)
    resumed["sft_step"] = sft.step
    resumed["sft"] = sft.train().history
    return resumed


def sampled_after_resume(out: Path) -> list[str]:
    """The completions one process samples (Hugging Face generate, rollout_seeding: rank) right after resuming the
    2-rank checkpoint: they come from the re-seeded RNG."""
    from grpo.trainer import GRPOTrainer

    model, tok, cfg, dataset, funcs, _ = grpo_setup()
    trainer = GRPOTrainer(model, tok, cfg, dataset, funcs, progress=False)
    trainer.resume(out / "grpo" / f"checkpoint-{CUT}")
    prompts = [row["prompt"] for row in trainer.next_rows()]
    return trainer.backend.generate(prompts, cfg.num_generations, trainer.sampling).completions


def compare(resumed: dict, history: dict, cut: int = CUT) -> None:
    """The resumed run continues the 2-rank one: same counters and data position, same losses up to float rounding."""
    assert resumed["grpo_step"] == cut and resumed["sft_step"] == cut
    assert resumed["grpo_sampler_at_cut"] == {"epoch": 0, "pos": 4 * cut}  # 4 prompts a step out of 12
    assert resumed["grpo_sampler"] == history["grpo_sampler"] == {"epoch": 1, "pos": 4}
    assert resumed["lr"] == pytest.approx(history["grpo"][cut - 1]["lr"])  # the schedule continues
    from grpo.rollout import mix_seed

    assert resumed["torch_seed"] == mix_seed(0, cut, 0)  # rank 0's sampling RNG re-seeded from (seed, step, rank)
    assert len(resumed["grpo"]) == len(resumed["sft"]) == STEPS - cut
    for a, b in zip(resumed["grpo"], history["grpo"][cut:], strict=True):
        for key in ("loss", "reward/mean", "kl", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(resumed["sft"], history["sft"][cut:], strict=True):
        for key in ("sft/loss", "sft/lr", "sft/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("files, run, why", [
    ([], {"deepspeed": True}, r"under DeepSpeed: it was written without DeepSpeed"),
    ([], {"deepspeed": False}, r"under plain torch: it was written without DeepSpeed"),
    (["engine/mp_rank_00_model_states.pt"], {"deepspeed": False}, r"written under ZeRO stage 0"),
    (["engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"], {"deepspeed": True, "zero_stage": 0},
     r"this run uses ZeRO stage 0"),
    (["engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"], {"deepspeed": False, "lora": True}, r"LoRA checkpoint"),
])
def test_what_cannot_be_resharded_is_refused_in_one_line(files, run, why, tmp_path):
    from grpo.checkpoint import reshard_problem

    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    problem = reshard_problem(tmp_path, 8, 4, **run)
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"checkpoint {tmp_path} was written by 8 rank(s) and this run has 4")
    assert "resume it with 8 rank(s)" in problem
    assert re.search(why, problem), problem


def test_zero_shards_are_resharded(tmp_path):
    from grpo.checkpoint import reshard_problem

    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert reshard_problem(tmp_path, 8, 4, deepspeed=True, zero_stage=3) is None
    assert reshard_problem(tmp_path, 8, 1, deepspeed=False) is None


def test_sft_refuses_a_checkpoint_whose_batches_differ(tmp_path):
    """Fewer examples than sft.batch_size: the batch is what the ranks can split evenly, so it depends on the world
    size; a checkpoint taken with other batches would not continue the data order."""
    from stages.core.sft import SFTTrainer

    model, tok, examples, cfg = sft_setup()
    cfg = cfg.model_copy(update={"batch_size": 8, "max_steps": 2, "checkpoint_every": 1})
    first = SFTTrainer(model, tok, examples[:6], cfg, output_dir=tmp_path, progress=False)
    assert first.batch_size == 6
    first.total_steps = 1
    first.train()
    state_file = tmp_path / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["batch_size"] == 6
    state_file.write_text(json.dumps({**state, "batch_size": 4}))  # what 4 ranks take of 6 examples
    again = SFTTrainer(sft_setup()[0], tok, examples[:6], cfg, output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"checkpoint-1 was written with batches of 4 examples and this run takes 6"):
        again.train(resume_from="latest")


def torchrun(nproc: int, port: int, *args) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc), "--master_port",
           str(port), __file__, *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_written_on_2_ranks_resumes_on_1(stage, tmp_path, caplog):
    torchrun(2, 29650 + stage, "write", stage, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["grpo"]) == len(history["sft"]) == STEPS

    with caplog.at_level(logging.INFO, logger="grpo.checkpoint"):
        resumed = resume_and_continue(None, tmp_path)  # one process, plain torch
    compare(resumed, history)
    said = [r.getMessage() for r in caplog.records if "re-seeded" in r.getMessage()]
    assert len(said) == 2 and "written by 2 rank(s), on 1" in said[0], said
    if stage == 2:  # sampled rollouts after such a resume are new draws, but the same on every resume
        first = sampled_after_resume(tmp_path)
        assert sampled_after_resume(tmp_path) == first and len(set(first)) > 1
    if stage == 3:
        # on 1 DeepSpeed rank (DeepSpeed's universal loader; the reference resharded into ZeRO-3), which checkpoints
        # every step; then its step-3 checkpoint on 2 ranks again (1 -> 2: each rank takes its slice)
        torchrun(1, 29660, "resume", stage, tmp_path)
        compare(json.loads((tmp_path / "resumed.json").read_text()), history)
        assert json.loads((tmp_path / "grpo" / "checkpoint-3" / "trainer_state.json").read_text())["world_size"] == 1
        torchrun(2, 29661, "widen", stage, tmp_path)
        compare(json.loads((tmp_path / "resumed.json").read_text()), history, cut=3)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    mode, stage, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    if mode == "write":
        write(stage, out)
    else:
        result = resume_and_continue(stage, out, every=1) if mode == "resume" else resume_and_continue(stage, out, 3)
        if torch.distributed.get_rank() == 0:
            (out / "resumed.json").write_text(json.dumps(result))


def test_a_stage_refuses_a_checkpoint_it_cannot_reshard_before_its_run_opens(mini_recipe, tmp_path):
    """The stage's work dir holds a checkpoint written by 8 plain-torch ranks (not reshardable): opening the stage
    refuses it in one line naming the checkpoint and both sizes, before an MLflow run opens or a model loads."""
    import mlflow

    from stages.core.context import stage_context
    from stages.core.lineage import StageInputError, stage_key

    cfg, inputs = mini_recipe.reasoning_rl, {"model": "runs:/0123/model"}
    workdir = tmp_path / "runs" / "reasoning_rl" / stage_key("reasoning_rl", cfg, inputs, mini_recipe)[:16]
    ckpt = workdir / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"world_size": 8, "global_step": 4}')
    with pytest.raises(StageInputError) as e, stage_context(mini_recipe, "reasoning_rl", cfg, inputs, None, False):
        pytest.fail("the stage opened")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"stage reasoning_rl: checkpoint {ckpt} was written by 8 rank(s) and this run has 1")
    assert "written without DeepSpeed" in str(e.value)
    mlflow.set_tracking_uri(mini_recipe.tracking.uri)
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run opened

    (ckpt / "trainer_state.json").write_text('{"world_size": 1, "global_step": 4}')  # same size: it opens
    with stage_context(mini_recipe, "reasoning_rl", cfg, inputs, None, False) as ctx:
        assert ctx.workdir == workdir
