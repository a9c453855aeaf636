"""Pieces of running a stage on several ranks that need no second process: the entry point's handling of stages without
a multi-rank path, the DeepSpeed config a stage picks, the launcher's process count, and a checkpoint refused (before
anything is loaded) when the number of ranks changed."""

from __future__ import annotations

import json

import pytest
import torch

from flows.launch import LaunchSpec
from grpo.checkpoint import STATE_FILE, CheckpointWorldSizeError, load_checkpoint
from grpo.distributed import is_distributed
from stages import entry
from stages.core import distributed
from stages.core.recipe import load_recipe


def test_checkpoint_from_another_world_size_is_refused_before_loading(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"global_step": 4, "world_size": 2}))

    class Engine:
        module = torch.nn.Linear(2, 2)  # a real module: the checkpoint reads its record (LoRA adapters or not) first
        is_deepspeed = False  # and a checkpoint without DeepSpeed's shards is not resharded

        def load(self, directory):
            raise AssertionError("the engine was loaded")

    with pytest.raises(CheckpointWorldSizeError, match=r"written by 2 rank\(s\) and this run has 1.*resume it with 2"):
        load_checkpoint(tmp_path, Engine(), None)


@pytest.fixture
def fake_stage(monkeypatch):
    calls = []

    def distill(recipe, inputs=None, parent_run_id=None, progress=True):
        calls.append(is_distributed())
        return {"run_id": "r", "data": "runs:/r/data"}

    monkeypatch.setattr("stages.registry.runnable", lambda: {"distill": distill})
    return calls


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stage_without_a_multi_rank_path_runs_on_rank_0_alone(rank, fake_stage, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    result = tmp_path / "result.json"
    assert entry.main(["distill", "--recipe", "tiny", "--result-file", str(result)]) == 0
    if rank == 1:
        assert fake_stage == [] and not result.exists()  # rank 1 left at once
    else:
        assert fake_stage == [False]  # one process, no process group
        assert json.loads(result.read_text())["run_id"] == "r"


def test_deepspeed_config_only_under_a_process_group(monkeypatch, tmp_path):
    recipe = load_recipe("tiny", {"cluster.deepspeed_config": "infra/deepspeed/zero3.json"})
    assert distributed.deepspeed_config(recipe) is None  # in-process: plain torch on one process
    monkeypatch.setattr("grpo.distributed.is_distributed", lambda: True)
    monkeypatch.chdir(tmp_path)  # a path relative to the repository is found from any folder
    assert distributed.deepspeed_config(recipe)["zero_optimization"]["stage"] == 3
    assert distributed.deepspeed_config(recipe, "infra/deepspeed/zero2.json")["zero_optimization"]["stage"] == 2
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        distributed.deepspeed_config(recipe, "bad.json")


def test_processes_per_node_from_the_recipe():
    cluster = load_recipe("tiny", {"cluster.launcher": "torchrun", "cluster.nproc_per_node": 2}).cluster
    assert LaunchSpec.from_cluster(cluster).nproc_per_node == 2
    gpus = load_recipe("tiny", {"cluster.launcher": "torchrun", "cluster.gpus_per_node": 8}).cluster
    assert LaunchSpec.from_cluster(gpus).nproc_per_node == 8
    assert LaunchSpec.from_cluster(load_recipe("tiny").cluster).nproc_per_node == 1
