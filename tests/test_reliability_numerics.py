"""Numerics: a NaN/inf loss or gradient skips the optimiser update (counted, logged as `skipped_steps`); several steps
in a row stop the run with NonFiniteError after saving a checkpoint of the still-finite weights. A checkpoint refuses
to load into another architecture, and its RNG state loads without pickle."""

from __future__ import annotations

import json

import pytest
import torch

from grpo.checkpoint import CheckpointMismatchError, latest_checkpoint
from grpo.engine import TorchEngine, lr_lambda
from grpo.logging import ConsoleLogger
from grpo.training import NonFiniteError
from tests.test_grpo_trainer import small_config


@pytest.fixture(scope="module")
def dataset():
    from stages.core.tasks import make_problems

    return [{"prompt": f"User: {p.question}\nAssistant:", "answer": p.answer} for p in make_problems("addition", 32, 1)]


class Poison:
    """NaN on the chosen optimiser updates (counted from 1): NaN gradients of a finite loss (a hook on the embedding
    weights, which fires once per backward), or, with `loss=True`, NaN logits in the training forward pass (grad
    enabled: not generation; the SFT loop runs one such forward per update)."""

    def __init__(self, model, updates: set[int], loss: bool = False):
        self.updates, self.n = updates, 0
        if loss:
            model.lm_head.register_forward_hook(self.forward_hook)
        else:
            model.get_input_embeddings().weight.register_hook(self.grad_hook)

    def forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        self.n += 1
        return output * float("nan") if self.n in self.updates else output

    def grad_hook(self, grad):
        self.n += 1
        return grad * float("nan") if self.n in self.updates else grad


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_torch_engine_skips_a_nan_loss_and_an_inf_gradient():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 10, "constant"))
    engine = TorchEngine(model, opt, sched, max_grad_norm=1.0)
    before = _params(model)
    engine.backward(model(torch.ones(1, 3)).sum() * float("nan"))
    engine.step()
    assert engine.last_skipped and engine.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state and sched.last_epoch == 0  # no optimiser step, no scheduler step
    assert all(p.grad is None for p in model.parameters())  # the bad gradient is gone

    loss = model(torch.ones(1, 3)).sum()  # a finite loss whose gradient is inf
    model.weight.register_hook(lambda g: g * float("inf"))
    engine.backward(loss)
    engine.step()
    assert engine.skipped_steps == 2 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    engine.backward(torch.nn.Linear(3, 1)(torch.ones(1, 3)).sum() + model.bias.sum())  # finite: applied
    engine.step()
    assert not engine.last_skipped and engine.skipped_steps == 2 and not torch.equal(model.bias, before["bias"])


def test_grpo_skips_counts_and_logs_nan_steps(tiny_model, tok, dataset, tmp_path):
    from grpo.trainer import GRPOTrainer

    model = tiny_model(tok)
    Poison(model, updates={2})  # the second step's update (μ=1, one minibatch: one update per step)
    logger = ConsoleLogger(printer=lambda line: None)
    trainer = GRPOTrainer(model, tok, small_config(steps_per_iteration=4), dataset, [("r", _len_reward, 1.0)],
                          logger=logger, output_dir=tmp_path, progress=False)
    history = trainer.train()
    assert [h["skipped_steps"] for h in history] == [0, 1, 1, 1]
    assert [step for step, m in logger.history] == [1, 2, 3, 4] and logger.history[1][1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["bad_in_a_row"] == 0


def test_grpo_stops_after_max_bad_steps_with_a_checkpoint(tiny_model, tok, dataset, tmp_path):
    from grpo.trainer import GRPOTrainer

    model = tiny_model(tok)
    Poison(model, updates={2, 3})  # finite loss, NaN gradients
    trainer = GRPOTrainer(model, tok, small_config(steps_per_iteration=6, max_bad_steps=2), dataset,
                          [("r", _len_reward, 1.0)], output_dir=tmp_path, progress=False)
    with pytest.raises(NonFiniteError, match=r"GRPO steps 2-3: 2 steps in a row .*max_bad_steps=2.*checkpoint-3"):
        trainer.train()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-3"
    saved = torch.load(ckpt / "policy.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved.values())
    # the checkpoint resumes (the counters come back) and the run goes on once the NaNs stop
    resumed = GRPOTrainer(tiny_model(tok), tok, small_config(steps_per_iteration=6, max_bad_steps=2), dataset,
                          [("r", _len_reward, 1.0)], output_dir=tmp_path, progress=False)
    history = resumed.train(resume_from="latest")
    assert len(history) == 3 and history[-1]["skipped_steps"] == 2


def test_sft_skips_nan_steps_and_stops_after_several(tiny_model, tok, tmp_path):
    from stages.core.sft import SFTConfig, SFTTrainer
    from tests.test_sft import SFT_MODEL

    examples = [{"prompt": f"User: {a}+{b}\nAssistant:", "completion": f" {a + b}"} for a in range(8) for b in range(4)]
    model = tiny_model(tok, **SFT_MODEL)
    Poison(model, updates={3}, loss=True)
    cfg = SFTConfig(max_steps=5, batch_size=8, warmup_steps=0, log_every=1, max_length=64)
    res = SFTTrainer(model, tok, examples, cfg, progress=False).train()
    assert [h["sft/skipped_steps"] for h in res.history] == [0, 0, 1, 1, 1] and res.steps == 5
    assert res.final_loss == res.final_loss  # the EMA skips the NaN loss

    model = tiny_model(tok, **SFT_MODEL)
    Poison(model, updates={2, 3, 4}, loss=True)
    trainer = SFTTrainer(model, tok, examples, cfg.model_copy(update={"max_bad_steps": 3}), output_dir=tmp_path,
                         progress=False)
    with pytest.raises(NonFiniteError, match=r"SFT steps 2-4: 3 steps in a row"):
        trainer.train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_checkpoint_of_another_architecture_is_refused_naming_the_file(tiny_model, tok, dataset, tmp_path):
    from grpo.trainer import GRPOTrainer

    cfg = small_config(steps_per_iteration=1)
    GRPOTrainer(tiny_model(tok), tok, cfg, dataset, [("r", _len_reward, 1.0)], output_dir=tmp_path,
                progress=False).train()
    other = GRPOTrainer(tiny_model(tok, hidden_size=48, intermediate_size=96), tok, cfg, dataset,
                        [("r", _len_reward, 1.0)], output_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-1 \(model_config.json\) belongs to a different "
                                                      r"model \(hidden_size: 32 in the checkpoint, 48 in the model"):
        other.train(resume_from="latest")


def _len_reward(prompts, completions, **kw):
    return [len(c) / 10 for c in completions]


def test_non_finite_weights_are_never_checkpointed(tiny_model, tok, dataset, tmp_path):
    """learning_rate=inf (past validation) makes every weight NaN in the first update; the later steps are skipped, the run stops. No
    checkpoint of those weights may be written (a rerun would resume from it): the error says there is no good one."""
    from grpo.trainer import GRPOTrainer

    # the recipe refuses lr=inf now; the guard must hold however weights go non-finite, so bypass validation here
    cfg = small_config(steps_per_iteration=6, max_bad_steps=2, checkpoint_every=1).model_copy(
        update={"learning_rate": float("inf")})
    trainer = GRPOTrainer(tiny_model(tok), tok, cfg, dataset, [("r", _len_reward, 1.0)], output_dir=tmp_path,
                          progress=False)
    with pytest.raises(NonFiniteError, match=r"GRPO steps 2-3: .*weights are no longer finite.*no checkpoint written\. "
                                             r"There is no earlier checkpoint"):
        trainer.train()
    assert not any(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.iterdir())


def test_the_stop_names_the_last_good_checkpoint_when_the_weights_went_bad(tiny_model, tok, dataset, tmp_path):
    from grpo.trainer import GRPOTrainer

    model = tiny_model(tok)
    calls = []

    def poisoning_reward(prompts, completions, **kw):  # at step 3 the weights turn NaN (as an inf update would)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return _len_reward(prompts, completions)

    cfg = small_config(steps_per_iteration=8, max_bad_steps=2, checkpoint_every=1, keep_checkpoints=None)
    trainer = GRPOTrainer(model, tok, cfg, dataset, [("r", poisoning_reward, 1.0)], output_dir=tmp_path,
                          progress=False)
    with pytest.raises(NonFiniteError, match=r"GRPO steps 3-4: .*no checkpoint written\. The last good checkpoint is "
                                             r".*checkpoint-2\."):
        trainer.train()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["checkpoint-1", "checkpoint-2"]
    saved = torch.load(latest_checkpoint(tmp_path) / "policy.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved.values())
