"""benchmarks/gpu_check.py, the script a lent GPU runs once: its CPU smoke run end to end, its time budget, its
tokenizer of ids, and the engine importing without the packages the GPU machine lacks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
PART_KEYS = {"model", "rollout", "status", "steps", "s_per_step", "tokens_per_s", "mfu", "peak_mb", "max_logprob_gap"}


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_smoke_measures_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_script("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    w = result["workload"]
    assert [(p["model"], p["rollout"]) for p in result["parts"]] == [("smoke", "fast"), ("smoke", "hf")]
    for part in result["parts"]:
        assert PART_KEYS <= part.keys(), part
        assert part["status"] == "ok" and part["steps"] == w["steps"] == 1
        assert 0 < part["generate_s_per_step"] < part["s_per_step"]
        assert 0 < part["tokens_per_step"] <= w["prompts"] * w["generations"] * w["completion_length"]
        assert math.isclose(part["tokens_per_s"], part["tokens_per_step"] / part["generate_s_per_step"], rel_tol=1e-3)
        assert math.isclose(part["mfu"], part["flops_per_step"] / part["s_per_step"] / result["peak_flops"],
                            rel_tol=1e-2)
        assert part["peak_mb"] > 0
        # the same weights scored two ways (bf16): a misaligned token or position would be off by nats, not 1e-2
        assert 0 <= part["max_logprob_gap"] < 0.05
    assert "s/step" in proc.stdout and "wrote" in proc.stdout


def test_spent_budget_skips_parts_saying_why(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_script("--smoke", "--budget", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert [p["status"] for p in parts] == ["skipped", "skipped"]
    assert all(p["reason"] == "time budget spent" for p in parts)


def test_unknown_model_is_refused_by_name():
    proc = run_script("--models", "qwen2.5-7b", timeout=120)
    assert proc.returncode == 2 and "qwen2.5-7b" in proc.stderr


def test_id_tokenizer_round_trips_random_prompts():
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import id_tokenizer, random_prompts

    tok = id_tokenizer(1000, eos_id=997)
    assert len(tok) == 1000 and tok.eos_token_id == tok.pad_token_id == 997
    rows = random_prompts(3, 50, 1000, eos_id=997, seed=0)
    ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    assert [len(i) for i in ids] == [50, 50, 50] and all(0 <= t < 1000 and t != 997 for i in ids for t in i)
    assert tok.decode(ids[0]) == rows[0]["prompt"]


def test_engine_imports_without_tracking_orchestration_or_deepspeed():
    """The GPU machine has torch, transformers and pydantic only: every module the script uses must import there."""
    code = (
        "import sys\n"
        "for name in ('mlflow', 'prefect', 'deepspeed', 'datasets', 'vllm', 'trl'):\n"
        "    sys.modules[name] = None\n"
        "try:\n"
        "    import mlflow\n"
        "    raise SystemExit('the guard did not block mlflow')\n"
        "except ImportError:\n"
        "    pass\n"
        "import grpo.trainer, grpo.rollout, grpo.fast, grpo.logprobs, benchmarks.gpu_check\n"
        "print('imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]
