"""The GRPO-vs-TRL benchmark runs (two steps of each side on a random-init mini model), so it cannot rot.

Speed targets live in the benchmark's report, not here: this only checks that both sides ran and were measured.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grpo_vs_trl.py"), "--smoke", "--threads", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "where a step's time goes" in proc.stdout and "targets" in proc.stdout
    result = json.loads(out.read_text())
    for side in ("ours", "trl"):
        s = result[side]
        assert s["steps"] == 2 and s["median_s_per_step"] > 0 and s["model_flops_per_step"] > 0
        assert set(s["phases_median_s"]) == {"generate", "rewards", "reference", "forward", "backward", "other"}
        assert s["phases_median_s"]["generate"] > 0 and s["phases_median_s"]["backward"] > 0
        assert len(result["per_step"][side]["accuracy"]) == 2
    assert result["config"]["trl"]["loss_type"] == "grpo" and result["config"]["ours"]["loss_aggregation"] == "sequence_mean"
    assert {t["target"].split()[0] for t in result["targets"]} >= {"steps/s", "time", "accuracy"}
