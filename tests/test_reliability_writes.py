"""Atomic writes: a checkpoint or a synthesis shard interrupted while it is being written (R1_FAULT_RAISE_AT at the
point before its rename) leaves only a `.tmp` that nothing trusts; the resume takes the last complete one and ends
where an uninterrupted run does."""

from __future__ import annotations

import pytest
import torch

from grpo.checkpoint import STATE_FILE, latest_checkpoint
from grpo.faults import InjectedFault
from tests.test_grpo_checkpoint import make_trainer


def test_a_checkpoint_interrupted_mid_write_is_never_resumed_from(tok, tmp_path, monkeypatch):
    full = make_trainer(tok, tmp_path / "full")
    full.train()
    params = {k: v.clone() for k, v in full.engine.module.state_dict().items()}

    monkeypatch.setenv("R1_FAULT_RAISE_AT", "checkpoint_write:6")
    monkeypatch.setenv("R1_FAULT_ONCE_DIR", str(tmp_path / "faults"))
    with pytest.raises(InjectedFault, match="checkpoint_write:6"):
        make_trainer(tok, tmp_path / "split").train()
    half = tmp_path / "split" / "checkpoint-6.tmp"
    assert half.exists() and not (half / STATE_FILE).exists()  # written, not published
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-3"

    resumed = make_trainer(tok, tmp_path / "split", seed_model=1)
    resumed.train(resume_from="latest")
    assert resumed.global_step == 8 and not half.exists()
    for k, v in resumed.engine.module.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_a_shard_interrupted_mid_write_is_redone(tmp_path, monkeypatch):
    from stages.core.sharding import load_shards, write_shard

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    write_shard(tmp_path, 0, rows[:2], {"shard": 0, "rows": 2, "next_batch": 1, "carry": [], "counts": {},
                                        "done": False})
    monkeypatch.setenv("R1_FAULT_RAISE_AT", "shard_write:2")
    with pytest.raises(InjectedFault):
        write_shard(tmp_path, 1, rows[2:], {"shard": 1, "rows": 2, "next_batch": 2, "carry": [], "counts": {},
                                            "done": True})
    assert (tmp_path / "shard-00001.tmp" / "rows").exists() and not (tmp_path / "shard-00001").exists()
    got, state = load_shards(tmp_path)
    assert got == rows[:2] and state["next_batch"] == 1  # the resume continues after shard 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000"]  # the half-written one is gone
