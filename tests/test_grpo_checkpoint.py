"""Checkpoint/resume: N steps uninterrupted == N/2 steps, checkpoint, fresh process state, resume, N/2 steps."""

import random

import pytest
import torch

from grpo.checkpoint import STATE_FILE, latest_checkpoint
from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from stages.core.tasks import make_problems
from tests.conftest import build_tiny_model


class OtherThreadDraws:
    """A logger that draws from the `random` module between steps, as other threads of the process do (Prefect's
    services after a flow ran in-process): the loop's own random stream must not see it."""

    def log_metrics(self, metrics, step):
        random.random()

    def log_params(self, params):
        random.random()


def make_trainer(tok, out, seed_model=0, logger=None):
    # 8 steps, iterations of 4: the resume at step 3 lands mid-iteration (the reference must come from the checkpoint)
    # and the run then crosses an iteration boundary (reference reset). μ=2 and minibatches exercise the optimiser
    # state; 8 prompts with B=3 cross epochs of the data.
    cfg = GRPOConfig(
        prompts_per_step=3,
        num_generations=4,
        iterations=2,
        steps_per_iteration=4,
        mu=2,
        minibatch_size=6,
        beta=0.05,
        learning_rate=1e-2,
        warmup_steps=2,
        lr_schedule="cosine",
        max_completion_length=8,
        max_prompt_length=32,
        checkpoint_every=3,
        seed=7,
    )
    dataset = [
        {"prompt": f"User: {p.question}\nAssistant:", "answer": p.answer} for p in make_problems("addition", 8, 1)
    ]

    def digits(prompts, completions, answer, **kw):
        return [sum(ch.isdigit() for ch in c) / 8 + random.random() * 0.01 for c in completions]  # uses python RNG too

    return GRPOTrainer(
        build_tiny_model(tok, seed_model), tok, cfg, dataset, [("digits", digits, 1.0)], output_dir=out, progress=False,
        logger=logger,
    )


def test_resume_equals_uninterrupted(tok, tmp_path):
    full = make_trainer(tok, tmp_path / "full", logger=OtherThreadDraws())  # the other run sees no such draws
    losses_full = [m["loss"] for m in full.train(max_steps=4)]
    at_iteration_2 = {k: v.clone() for k, v in full.engine.module.state_dict().items()}  # π_ref of steps 5-8
    losses_full += [m["loss"] for m in full.train()]
    params_full = {k: v.clone() for k, v in full.engine.module.state_dict().items()}

    first = make_trainer(tok, tmp_path / "split")
    first.train(max_steps=3)
    ckpt = latest_checkpoint(tmp_path / "split")
    assert ckpt is not None and ckpt.name == "checkpoint-3" and (ckpt / STATE_FILE).exists()
    assert not list((tmp_path / "split").glob("*.tmp"))

    # a new trainer (different init, RNGs moved on) resumes from the checkpoint
    torch.manual_seed(123)
    random.seed(123)
    second = make_trainer(tok, tmp_path / "split", seed_model=1)
    losses_second = [m["loss"] for m in second.train(resume_from="latest")]
    assert second.global_step == 8 and len(losses_second) == 5
    # checkpoints at 3, 6 and the last step 8; keep_checkpoints=2 leaves the newest two
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert losses_second == losses_full[3:]
    for k, v in second.engine.module.state_dict().items():
        assert torch.equal(v, params_full[k]), k
    # both runs reset the reference at the iteration boundary (step 4), the resumed one after loading step 3's
    for run in (full, second):
        ref = run.reference.state_dict()
        assert all(torch.equal(ref[k], v) for k, v in at_iteration_2.items())
        assert not all(torch.equal(ref[k], v) for k, v in params_full.items())


def test_resume_from_incomplete_checkpoint_fails(tok, tmp_path):
    (tmp_path / "checkpoint-9").mkdir()
    trainer = make_trainer(tok, tmp_path)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        trainer.train(resume_from=tmp_path / "checkpoint-9")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        trainer.train(resume_from="latest")
