"""The GRPO-vs-TRL benchmark runs (two steps of each side on a random-init mini model), so it cannot rot.

Speed targets live in the benchmark's report, not here: this only checks that both sides ran and were measured.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_threshold_crossing_is_per_seed_and_averaged():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from grpo_vs_trl import SideLog, summarize, threshold_crossing

    def log(acc):
        return SideLog("x", seconds=[1.0] * len(acc), accuracy=acc, phases=[{}] * len(acc),
                       completion_tokens=[10] * len(acc))

    early, late = log([0.0, 1.0, 1.0, 1.0]), log([0.0, 0.0, 0.0, 1.0, 1.0])
    assert threshold_crossing(early, 0.75, 2) == (3, 3.0)  # steps 2-3 average 1.0; step 1-2 average 0.5
    assert threshold_crossing(late, 0.75, 2) == (5, 5.0)
    both = summarize([early, late], 0, 0.75, 2)
    assert both["steps_to_threshold_per_seed"] == [3, 5] and both["steps_to_threshold"] == 4.0
    assert both["seconds_to_threshold"] == 4.0 and both["accuracy_mean_all"] == 5 / 9
    assert summarize([early, log([0.0, 0.0])], 0, 0.75, 2)["steps_to_threshold"] is None  # one seed never got there


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grpo_vs_trl.py"), "--smoke", "--threads", "1", "--seeds", "0,1",
         "--json", str(out)],
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
        # two seeds, two A/B runs: per-seed records, pooled timings
        assert s["seeds"] == 2 and len(s["steps_to_threshold_per_seed"]) == 2
        assert [len(run["accuracy"]) for run in result["per_step"][side]] == [2, 2]
        assert result["per_step"][side][0]["seconds"] != result["per_step"][side][1]["seconds"]
    assert result["config"]["trl"]["loss_type"] == "grpo" and result["config"]["ours"]["loss_aggregation"] == "sequence_mean"
    assert {t["target"].split()[0] for t in result["targets"]} >= {"steps/s", "time", "accuracy"}
