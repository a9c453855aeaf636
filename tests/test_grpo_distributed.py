"""One code path for 1 or N ranks: 2 CPU ranks under DeepSpeed ZeRO-2/3 (gloo) train like 1 process on the whole batch.

Completions come from a scripted backend (fixed texts per prompt) so that both runs see the same rollout; the prompts
are sharded across ranks with each group kept whole. The mean over ranks of per-rank losses is the whole-batch loss
(sequence_mean: equal shards; token_mean: the token count is averaged over ranks), so the parameters after the run must
match the single-process run. The workers also
check that resuming from a DeepSpeed checkpoint reproduces the uninterrupted run exactly, and export the model.

Run as a script (by torchrun) this file is the worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

G = 4
TEXTS = ["<think>1+2=3</think><answer>3</answer>", "12", "abc def", "<answer>7</answer> so 9"]


def setup(aggregation: str = "sequence_mean"):
    from grpo.config import GRPOConfig
    from grpo.rollout import rollout_from_completions
    from stages.core.tasks import clean_trace, make_problems
    from stages.core.tokenizer import train_tokenizer
    from tests.conftest import build_tiny_model

    problems = make_problems("addition", 100, seed=0)
    tok = train_tokenizer([f"User: {p.question}\nAssistant:{clean_trace(p)}" for p in problems], vocab_size=320)
    model = build_tiny_model(tok)
    dataset = [{"prompt": f"User: {p.question}\nAssistant:", "k": i} for i, p in enumerate(problems[:12])]

    class ScriptedBackend:
        def generate(self, prompts, num_generations, sampling):
            # groups of different total lengths, so per-rank token counts differ
            completions = [
                TEXTS[(len(p) + j) % len(TEXTS)] * (1 + len(p) % 3) for p in prompts for j in range(num_generations)
            ]
            return rollout_from_completions(tok, prompts, completions, num_generations)

    def digits(prompts, completions, k, **kw):
        return [sum(ch.isdigit() for ch in c) + 0.1 * (ki % 3) * len(c) for c, ki in zip(completions, k)]

    cfg = GRPOConfig(
        prompts_per_step=4,
        num_generations=G,
        steps_per_iteration=3,
        mu=2,
        beta=0.1,
        learning_rate=1e-2,
        max_completion_length=16,
        max_prompt_length=32,
        max_grad_norm=0.5,
        loss_aggregation=aggregation,
        seed=0,
    )
    return model, tok, cfg, dataset, [("digits", digits, 1.0)], ScriptedBackend()


def worker(stage: int, out: str, aggregation: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from grpo.trainer import GRPOTrainer

    deepspeed.init_distributed(dist_backend="gloo")
    model, tok, cfg, dataset, funcs, backend = setup(aggregation)
    ds_config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}
    cfg.checkpoint_every = 2
    trainer = GRPOTrainer(
        model,
        tok,
        cfg,
        dataset,
        funcs,
        backend=backend,
        deepspeed_config=ds_config,
        progress=False,
        output_dir=os.path.join(out, "ckpt"),
    )
    history = trainer.train()
    params = trainer.engine.full_state_dict()
    trainer.save()  # collective checkpoint save (rank 0 renames)
    trainer.save_model(os.path.join(out, "model"))
    if stage == 3:  # the reference is partitioned like the policy (never whole on a rank) and reset shard by shard
        ref, policy = trainer.reference, trainer.engine.module
        assert ref is not policy and all(hasattr(q, "ds_id") and q.ds_tensor.numel() < q.ds_numel
                                         for q in ref.parameters())
        assert trainer.engine.make_reference() is ref
        assert all(torch.equal(p.ds_tensor, q.ds_tensor) for p, q in zip(policy.parameters(), ref.parameters()))

    # resume from step 2 (mid-iteration: the reference comes from the checkpoint) in a fresh engine
    model2, *_ = setup(aggregation)
    resumed = GRPOTrainer(
        model2,
        tok,
        cfg,
        dataset,
        funcs,
        backend=backend,
        deepspeed_config=ds_config,
        progress=False,
        output_dir=os.path.join(out, "ckpt"),
    )
    resumed_history = resumed.train(resume_from=os.path.join(out, "ckpt", "checkpoint-2"))
    assert [m["loss"] for m in resumed_history] == [m["loss"] for m in history[2:]]
    for k, v in resumed.engine.full_state_dict().items():
        assert torch.equal(v, params[k]), k
    if dist.get_rank() == 0:
        torch.save(params, os.path.join(out, "params.pt"))
        Path(out, "history.json").write_text(json.dumps(history))
    dist.barrier()
    nan_gradients_on_one_rank_skip_everywhere(out, aggregation, ds_config)


def nan_gradients_on_one_rank_skip_everywhere(out: str, aggregation: str, ds_config: dict) -> None:
    """NaN gradients on rank 1 only: every rank skips the same updates (DeepSpeed's all-reduced overflow check), the
    weights stay as they were, and after max_bad_steps steps every rank stops with NonFiniteError."""
    import torch.distributed as dist

    from grpo.trainer import GRPOTrainer
    from grpo.training import NonFiniteError

    model, tok, cfg, dataset, funcs, backend = setup(aggregation)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if dist.get_rank() == 1:
        model.get_input_embeddings().weight.register_hook(lambda g: g * float("nan"))
    cfg = cfg.model_copy(update={"max_bad_steps": 2})
    trainer = GRPOTrainer(model, tok, cfg, dataset, funcs, backend=backend, deepspeed_config=ds_config,
                          progress=False, output_dir=os.path.join(out, "nan"))
    try:
        trainer.train()
        raise AssertionError("no NonFiniteError")
    except NonFiniteError as e:
        assert "GRPO steps 1-2" in str(e), e
    assert trainer.engine.skipped_steps == 2 * cfg.mu, trainer.engine.skipped_steps
    for k, v in trainer.engine.full_state_dict().items():
        assert torch.equal(v, initial[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("stage, aggregation", [(2, "token_mean"), (3, "sequence_mean")])
def test_two_ranks_match_one_process(stage, aggregation, tmp_path):
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29600 + stage),
        __file__,
        str(stage),
        str(tmp_path),
        aggregation,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint-3" / "trainer_state.json").exists()

    from grpo.trainer import GRPOTrainer

    model, tok, cfg, dataset, funcs, backend = setup(aggregation)
    single = GRPOTrainer(model, tok, cfg, dataset, funcs, backend=backend, progress=False)
    history = single.train()
    ds_history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == len(ds_history) == cfg.total_steps
    for a, b in zip(history, ds_history, strict=True):
        for key in ("loss", "reward/mean", "kl", "clip_low", "clip_high", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    ds_params = torch.load(tmp_path / "params.pt")
    for k, v in single.engine.module.state_dict().items():
        assert torch.allclose(v, ds_params[k], atol=1e-5), k
    # the exported model (gathered under ZeRO-3) reloads through the Auto classes
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ds_params[k]), k


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
