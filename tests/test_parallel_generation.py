"""Data-parallel rejection sampling (stages/core/sharding.py): N ranks generate disjoint generation batches into their own
shards and rank 0 merges them in batch order, giving exactly a 1-rank run's rows and counts, target cut-off included;
a rank killed mid-shard resumes only its own work. The synthesize stage on 2 torchrun ranks matches one process. The
vLLM bulk path runs against a fake `vllm` module (vLLM cannot run here): one seed per completion, weights read from
the model's directory, no weight sync. Held-out and benchmark evaluation on 2 ranks give 1 rank's samples and metrics.

Run as a script (by torchrun) this file is the sampling worker (`eval MODEL OUT`: the evaluation worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import mlflow
import pytest

TARGET, SHARD_ROWS = 12, 2


def sampler():
    """48 addition prompts in 12 batches of 4, k=2; a scripted backend answers right about one time in three, drawing
    from the global torch stream as Hugging Face generate does (the sampler seeds it per batch)."""
    import torch

    from stages.core.recipe import PromptConfig
    from stages.core.rejection import Filters, RejectionSampler
    from stages.core.tasks import make_problems

    problems = make_problems("addition", 48, seed=2)
    answers = {f"User: {p.question}\nAssistant:": p.answer for p in problems}

    class ScriptedBackend:
        def generate(self, prompts, k, sampling, seeds=None):
            draws = torch.randint(0, 3, (len(prompts) * k,)).tolist()
            texts = [f" <think>add them, that is it.</think><answer>{answers[prompts[j // k]] if d == 0 else 'x'}"
                     f"</answer>" for j, d in enumerate(draws)]
            return types.SimpleNamespace(completions=texts, truncated=[False] * len(texts),
                                         lengths=[len(t.split()) + 1 for t in texts])

    s = RejectionSampler(None, problems, source_run="scripted", prompt=PromptConfig(),
                         samples_per_prompt=2, temperature=1.0, max_new_tokens=16,
                         filters=Filters(), batch_prompts=4, seed=7)
    return s, ScriptedBackend


def run_sampling(shard_dir: Path, record: Path | None = None):
    """sample_sharded on this process's ranks; `record`: where each rank writes the batches it generated."""
    from stages.core.sharding import generation_rank, sample_sharded

    s, backend = sampler()
    generated = []
    sample_batch = s.sample_batch
    s.sample_batch = lambda b: generated.append(b) or sample_batch(b)
    gen = generation_rank()
    try:
        return sample_sharded(s, backend, TARGET, shard_dir, SHARD_ROWS, gen=gen, label="test", progress=False)
    finally:
        if record is not None:
            (record / f"generated-rank{gen.rank}.json").write_text(json.dumps(generated))


def worker(shard_dir: str, out: str) -> None:
    from stages.core.distributed import init_from_env

    init_from_env()
    merged = run_sampling(Path(shard_dir), Path(out))
    if merged is not None:
        rows, counts = merged
        (Path(out) / "merged.json").write_text(json.dumps({"rows": rows, "counts": counts.to_json()}))


def torchrun(shard_dir: Path, out: Path, port: int, **env) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
           __file__, str(shard_dir), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The reference: one process generating every batch in order."""
    out = tmp_path_factory.mktemp("one_rank")
    rows, counts = run_sampling(out / "shards", out)
    return rows, counts, json.loads((out / "generated-rank0.json").read_text()), out / "shards"


def test_one_rank_stops_at_the_target_and_a_rerun_generates_nothing(one_rank, tmp_path):
    rows, counts, generated, shards = one_rank
    assert len(rows) == TARGET and counts.passed >= TARGET
    assert generated == list(range(len(generated))) and len(generated) < 12  # stopped before the prompts ran out
    assert counts.prompts == 4 * len(generated) and counts.generated == 8 * len(generated)
    assert [int(r["prompt_id"][1:]) for r in rows] == sorted(int(r["prompt_id"][1:]) for r in rows)  # batch order
    assert sorted(p.name for p in (shards / "rank-0").iterdir()) == [f"shard-{i:05d}" for i in range(TARGET // 2)]
    again = run_sampling(shards, tmp_path)
    assert json.loads((tmp_path / "generated-rank0.json").read_text()) == []
    assert again[0] == rows and again[1] == counts


def test_two_ranks_keep_the_rows_of_one(one_rank, tmp_path):
    rows, counts, generated, _ = one_rank
    proc = torchrun(tmp_path / "shards", tmp_path / "out", 29650)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "merged.json").read_text())
    assert merged["rows"] == rows  # the same rows, in the same order, cut at the same place
    assert merged["counts"] == counts.to_json()  # counted over the same batches
    by_rank = [json.loads((tmp_path / "out" / f"generated-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(b % 2 == r for r, batches in enumerate(by_rank) for b in batches)  # batch b is rank b mod 2's
    # ranks learn the kept rows one round late: they generated past the 1-rank cut, and the merge dropped those
    assert len(by_rank[0]) + len(by_rank[1]) > len(generated)
    cut_round = (len(generated) - 1) // 2  # the round of the batch that reached the target
    assert len(by_rank[0]) + len(by_rank[1]) <= 2 * (cut_round + 2) < 12  # ...stopping one round after it
    assert sorted(by_rank[0] + by_rank[1])[: len(generated)] == generated

    # the shards say how many ranks wrote them: one process cannot resume them
    from stages.core.sharding import ShardWorldSizeError

    with pytest.raises(ShardWorldSizeError, match=r"written by 2 generating ranks and this run has 1.*resume it with 2"):
        run_sampling(tmp_path / "shards")


def test_a_rank_killed_mid_shard_resumes_only_its_own_work(one_rank, tmp_path):
    rows, counts, *_ = one_rank
    once = tmp_path / "once"
    once.mkdir()
    (once / "shard_write-2-rank0").write_text("")  # the point fires on rank 1 only
    shards = tmp_path / "shards"
    proc = torchrun(shards, tmp_path / "first", 29651, R1_FAULT_KILL_AT="shard_write:2", R1_FAULT_ONCE_DIR=str(once))
    assert proc.returncode != 0 and (once / "shard_write-2-rank1").exists(), proc.stderr[-3000:]
    assert (shards / "rank-1" / "shard-00001.tmp" / "rows").exists()  # killed inside its second shard's write
    finished = {p: p.stat().st_mtime_ns for p in shards.glob("rank-*/shard-*[0-9]/state.json")}
    done_batches = {b for p in finished for b, *_ in json.loads(p.read_text())["batches"]}
    assert shards / "rank-1" / "shard-00000" / "state.json" in finished

    proc = torchrun(shards, tmp_path / "second", 29652)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = {r: json.loads((tmp_path / "second" / f"generated-rank{r}.json").read_text()) for r in (0, 1)}
    assert not done_batches & set(again[0] + again[1])  # batches in finished shards were not generated again
    assert all(b % 2 == r for r, batches in again.items() for b in batches)  # each rank redid only its own
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished shards untouched
    assert not list(shards.glob("rank-*/*.tmp"))
    merged = json.loads((tmp_path / "second" / "merged.json").read_text())
    assert merged["rows"] == rows and merged["counts"] == counts.to_json()


def test_merge_refuses_a_missing_batch(tmp_path):
    from stages.core.rejection import Counts
    from stages.core.sharding import merge_shards, rank_dir, write_shard

    row = {"prompt": "p", "completion": "c"}
    for r, b in ((0, 0), (1, 3)):  # batches 1 and 2 are nobody's
        write_shard(rank_dir(tmp_path, r), 0, [row], {"shard": 0, "rows": 1, "world": 2, "next_batch": b + 2,
                                                      "carry": [], "batches": [[b, 1, Counts().to_json()]],
                                                      "done": True})
    assert merge_shards(tmp_path, 2, 1)[0] == [row]  # the target is met before the gap
    with pytest.raises(RuntimeError, match="generation batch 1 is in no rank's shards"):
        merge_shards(tmp_path, 2, 3)


# ---- the synthesize stage on 2 torchrun ranks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory):
    """A mini model pretrained just enough to stop before max_new_tokens now and then (synthesis keeps those)."""
    from stages.base_model import build_base_model
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    out = tmp_path_factory.mktemp("pargen_model") / "model"
    build_base_model(load_recipe("tiny", {**MINI, "base_model.max_steps": 40, "base_model.learning_rate": 1e-2}), out,
                     progress=False)
    return str(out)


def synth_recipe(root: Path, **over):
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    return load_recipe("tiny", {
        **MINI, "tracking.uri": f"sqlite:///{root}/mlflow.db", "output_dir": str(root / "runs"),
        "synthesize.max_prompts": 32, "synthesize.samples_per_prompt": 2, "synthesize.batch_prompts": 4,
        "synthesize.require_correct": False, "synthesize.require_format": False, "synthesize.require_language": False,
        "synthesize.max_new_tokens": 32, "synthesize.max_completion_tokens": 32, "synthesize.reasoning_target": 6,
        "synthesize.general_target": 2, "synthesize.shard_size": 2, "synthesize.samples_to_log": 4, **over})


def test_synthesize_on_two_ranks_writes_the_rows_of_one(stopping_model, tmp_path):
    from flows.launch import LaunchSpec, launch_stage
    from stages.core.data import load_rows

    def rows_and_metrics(store: str, out: dict):
        client = mlflow.MlflowClient(store)
        run = client.get_run(out["run_id"])
        rows = load_rows(mlflow.artifacts.download_artifacts(artifact_uri=out["data"], tracking_uri=store))
        return rows, run.data.metrics, run

    one = synth_recipe(tmp_path / "one")
    single = launch_stage("synthesize", one, None, None, LaunchSpec(target="local"), inputs={"model": stopping_model})
    two = synth_recipe(tmp_path / "two", **{"cluster.launcher": "torchrun", "cluster.nproc_per_node": 2,
                                            "cluster.env": {"OMP_NUM_THREADS": "1"}, "cluster.timeout": 300})
    lines, t0 = [], time.perf_counter()
    out = launch_stage("synthesize", two, None, None, LaunchSpec.from_cluster(two.cluster), log=lines.append,
                       inputs={"model": stopping_model})
    text = "\n".join(lines)
    assert "rank 0 of 2 joined" in text and "rank 1 of 2 joined" in text, text[-3000:]
    rows1, m1, _ = rows_and_metrics(one.tracking.uri, single)
    rows2, m2, run = rows_and_metrics(two.tracking.uri, out)
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient(two.tracking.uri)
    assert sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments()) == 1  # rank 0's
    assert len(rows1) == 8 and rows2 == rows1  # 6 reasoning rows (the same, in the same order) + 2 general
    for k in ("synth/generated", "synth/passed", "synth/prompts", "synth/reasoning_rows", "synth/rejected_too_long"):
        assert m2[k] == m1[k], k
    work = Path(two.output_dir) / "synthesize"
    assert {p.name for p in work.glob("*/shards/rank-*")} == {"rank-0", "rank-1"}  # each rank wrote its own shards
    print(f"synthesize on 2 torchrun ranks: {time.perf_counter() - t0:.1f} s")


# ---- evaluation on 2 ranks --------------------------------------------------------------------------------------------

EVAL = {"eval.num_prompts": 7, "eval.samples_per_prompt": 3, "eval.batch_size": 6, "eval.max_new_tokens": 12,
        "eval.temperature": 1.0, "eval.top_p": 0.9}  # 2 prompts per batch: batches 0-3, the last one short


def run_evaluation(model_dir: str, record: Path | None = None) -> dict:
    """Held-out evaluation and the AIME-shaped fixture on this process's ranks: rank 0's metrics and samples ({} on the
    others); `record`: where each rank writes how many prompts it generated for."""
    import torch

    from grpo.distributed import rank
    from grpo.rollout import HFGenerateBackend
    from stages.core.benchmarks import cli_benchmark, evaluate_benchmark, load_benchmark
    from stages.core.evaluate import evaluate
    from stages.core.heldout import heldout_problems
    from stages.core.models import load_model_and_tokenizer
    from stages.core.recipe import load_recipe

    recipe = load_recipe("tiny", EVAL)
    bench = cli_benchmark("aime-fixture", 2)
    model, tok = load_model_and_tokenizer(model_dir)
    prompts, generate = [], HFGenerateBackend.generate
    HFGenerateBackend.generate = lambda self, p, *a, **kw: prompts.append(len(p)) or generate(self, p, *a, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float rounding in this process and in the torchrun workers
    try:
        res = evaluate(model, tok, heldout_problems(recipe), recipe.eval, recipe.prompt)
        scores = evaluate_benchmark(model, tok, load_benchmark(bench), bench, recipe.eval, recipe.prompt)
    finally:
        HFGenerateBackend.generate = generate
        torch.set_num_threads(threads)
    if record is not None:
        (record / f"prompts-rank{rank()}.json").write_text(json.dumps(prompts))
    if res is None:
        assert scores is None  # the other ranks only generate
        return {}
    return {"eval": res.metrics(), "samples": res.samples, "bench": scores.metrics()}


def eval_worker(model_dir: str, out: str) -> None:
    from stages.core.distributed import init_from_env

    init_from_env()
    result = run_evaluation(model_dir, Path(out))
    if result:
        (Path(out) / "eval.json").write_text(json.dumps(result))


def test_evaluation_on_two_ranks_equals_one(stopping_model, tmp_path):
    one = run_evaluation(stopping_model, tmp_path)
    one_rank_prompts = json.loads((tmp_path / "prompts-rank0.json").read_text())
    out = tmp_path / "two"
    out.mkdir()
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29653",
           __file__, "eval", stopping_model, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((out / "eval.json").read_text())
    assert two["samples"] == one["samples"]  # the same completions, in prompt order
    assert two["eval"] == one["eval"] and two["bench"] == one["bench"]
    assert one["eval"]["eval/num_prompts"] == 7 and len(one["samples"]) == 21 and one["bench"]["bench/aime-fixture/samples"] == 2
    assert len({s["completion"] for s in one["samples"]}) > 7  # sampled: the 3 samples of a prompt differ
    by_rank = [json.loads((out / f"prompts-rank{r}.json").read_text()) for r in (0, 1)]
    # held-out: 4 batches (2, 2, 2, 1 prompts), sampled then greedy; rank 0 has batches 0 and 2, rank 1 has 1 and 3
    assert by_rank[0][:4] == [2, 2, 2, 2] and by_rank[1][:4] == [2, 2, 1, 1]
    assert sum(by_rank[0]) + sum(by_rank[1]) == sum(one_rank_prompts)  # every prompt generated once, by one rank


# ---- the vLLM bulk path, against a fake vLLM -----------------------------------------------------------------------

class FakeVLLM:
    """vllm.LLM and vllm.SamplingParams as the bulk path uses them; records the engine arguments and the requests."""

    def __init__(self, eos_id: int):
        self.llms, self.requests = [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        class LLM:
            def __init__(self, **kw):
                fake.llms.append(kw)
                self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                    driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=types.SimpleNamespace(
                        load_weights=lambda w: pytest.fail("bulk generation loaded weights into vLLM"))))))

            def generate(self, requests, sampling_params, use_tqdm=True):
                fake.requests.extend(zip(requests, sampling_params))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    token_ids=[5 + sp.seed % 7, 6, eos_id], finish_reason="stop")]) for sp in sampling_params]

            def reset_prefix_cache(self):
                pass

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def test_vllm_bulk_generation_seeds_each_completion(mini_base, monkeypatch):
    from grpo.rollout import completion_seed, mix_seed
    from stages.core.models import load_tokenizer
    from stages.core.recipe import PromptConfig, load_recipe
    from stages.core.rejection import Filters, RejectionSampler, load_backend
    from stages.core.tasks import make_problems

    tok = load_tokenizer(mini_base)
    fake = FakeVLLM(tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    recipe = load_recipe("tiny", {"synthesize.rollout_backend": "vllm", "synthesize.max_new_tokens": 8,
                                  "synthesize.vllm": {"gpu_memory_utilization": 0.8, "max_num_seqs": 64}})
    cfg = recipe.synthesize
    backend = load_backend(mini_base, cfg, recipe)
    engine = fake.llms[0]
    assert engine["model"] == str(Path(mini_base)) and engine["gpu_memory_utilization"] == 0.8
    assert engine["max_num_seqs"] == 64 and engine["distributed_executor_backend"] == "external_launcher"
    assert engine["max_model_len"] == 256 and "tensor_parallel_size" not in engine  # the mini model's context
    assert engine["seed"] == recipe.seed
    problems = make_problems("addition", 6, seed=1)
    s = RejectionSampler(backend, problems, source_run="m", prompt=PromptConfig(),
                         samples_per_prompt=3, temperature=0.7, max_new_tokens=8,
                         filters=Filters(require_correct=False, require_format=False, require_language=False,
                                         dedupe=False), batch_prompts=4, seed=recipe.seed, seeded_completions=True)
    rows, counts = s.sample_batch(1)  # prompts 4 and 5
    assert counts.generated == 6 and len(rows) == 6 and counts.prompts == 2
    seeds = [sp.seed for _, sp in fake.requests]
    assert seeds == [completion_seed(mix_seed(recipe.seed, i), j) for i in (4, 5) for j in range(3)]
    assert all(sp.temperature == 0.7 and sp.max_tokens == 8 for _, sp in fake.requests)
    assert [r["length"] for r in rows] == [2] * 6 and not any(c["truncated"] for c in s.candidates(1))


def test_vllm_settings_refused_before_any_model_loads(monkeypatch):
    from stages import synthesize
    from stages.core.recipe import load_recipe

    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=2 needs rollout_backend: vllm"):
        load_recipe("tiny", {"synthesize.vllm_tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="vllm.sleep"):
        load_recipe("tiny", {"cold_start_sft.rollout_backend": "vllm", "cold_start_sft.vllm": {"sleep": True}})
    from stages.core.preflight import check_cluster

    three = load_recipe("tiny", {"cluster.launcher": "torchrun", "cluster.nproc_per_node": 3,
                                 "synthesize.rollout_backend": "vllm", "synthesize.vllm_tensor_parallel_size": 2})
    assert check_cluster(three, ["synthesize"]) == [
        "synthesize.vllm_tensor_parallel_size: 2 does not divide the 3 ranks of cluster (1 node(s))"]
    from grpo.rollout_vllm import VLLMNotInstalledError

    monkeypatch.delitem(sys.modules, "vllm", raising=False)  # not installed here
    recipe = load_recipe("tiny", {"synthesize.rollout_backend": "vllm", "synthesize.vllm_tensor_parallel_size": 4})
    with pytest.raises(VLLMNotInstalledError, match=r"gpu"):
        synthesize.run(recipe, {"model": "/no/such/model"}, progress=False)


if __name__ == "__main__":
    eval_worker(*sys.argv[2:]) if sys.argv[1] == "eval" else worker(*sys.argv[1:])
