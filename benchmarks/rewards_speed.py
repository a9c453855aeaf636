"""How long the reasoning-RL rewards (accuracy + format + language consistency) take on one GRPO batch.

1,024 completions (128 prompts x 8) built from `stages.core.tasks`: addition traces with the tiny preset's noise (wrong
answers, missing tags, Chinese words mixed in) and reasoning-gym rows (scored by reasoning-gym), plus optionally a share
of LaTeX answers that only math-verify can judge (`--latex-share`). Prints the median seconds of a few runs.

    OMP_NUM_THREADS=1 python benchmarks/rewards_speed.py [--runs 5] [--latex-share 0.05] [--workers 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from grpo.rewards_io import call_reward
from rewards import build_rewards
from rewards.math_verifier import shared_verifier
from stages.core.tasks import TraceNoise, _mix_language, make_problems, noisy_trace

RG_FAMILIES = ["rg:basic_arithmetic", "rg:chain_sum", "rg:fraction_simplification", "rg:word_sorting"]


def latex_row(rng: random.Random) -> tuple[str, str]:
    """(gold, prediction) that only math-verify can compare: equivalent or wrong fractions and expressions."""
    a, b, k = rng.randint(1, 50), rng.randint(51, 99), rng.randint(2, 9)
    return rng.choice(
        [
            (f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{k * a}}}{{{k * b}}}"),
            (f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a + 1}}}{{{b}}}"),
            (f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a}}}"),
            (f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2"),
        ]
    )


def build_batch(n_prompts: int = 128, group: int = 8, latex_share: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    noise = TraceNoise()
    n_rg = n_prompts // 4
    rows = make_problems("addition", n_prompts - n_rg, seed=seed)
    for i, fam in enumerate(RG_FAMILIES):
        rows += make_problems(fam, n_rg // len(RG_FAMILIES) + (i < n_rg % len(RG_FAMILIES)), seed=seed + i)
    prompts, completions, cols = [], [], {"answer": [], "task": [], "metadata": [], "prompt_id": []}
    for pid, p in enumerate(rows):
        for _ in range(group):
            if rng.random() < latex_share:
                gold, pred = latex_row(rng)
                task, meta = "math", "{}"
                text = f"<think>simplify step by step, so the answer is {pred}.</think><answer>{pred}</answer>"
            elif p.task == "addition":
                gold, task, meta = p.answer, p.task, p.metadata
                text = noisy_trace(p, rng, noise)
            else:
                gold, task, meta = p.answer, p.task, p.metadata
                ans = gold if rng.random() < 0.5 else rng.choice(["42", "no idea", gold[::-1]])
                think = "first read the question. then work it out carefully. so the answer is above."
                if rng.random() < noise.mixed_language:
                    think = _mix_language(think, rng)
                text = f"<think>{think}</think><answer>{ans}</answer>"
                if rng.random() < noise.no_tags:
                    text = f"{think} {ans}"
            prompts.append(f"User: {p.question}\nAssistant:")
            completions.append((" " if rng.random() < 0.5 else "") + text)
            for k, v in (("answer", gold), ("task", task), ("metadata", meta), ("prompt_id", str(pid))):
                cols[k].append(v)
    return prompts, completions, cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--latex-share", type=float, default=0.0, help="share of completions judged by math-verify")
    ap.add_argument("--workers", type=int, default=1, help="math-verify worker processes")
    args = ap.parse_args()

    prompts, completions, cols = build_batch(args.prompts, args.group, args.latex_share)
    rewards = build_rewards(
        [
            {"name": "accuracy", "params": {"math_verify_workers": args.workers}},
            {"name": "format"},
            {"name": "language_consistency", "params": {"target_language": "en"}},
        ]
    )
    times: dict[str, list[float]] = {name: [] for name, _, _ in rewards}
    totals = []
    for run in range(args.runs + 1):  # run 0 warms up (imports, reasoning-gym scorers, math-verify workers)
        shared_verifier(args.workers, 5.0)._cache.clear()  # every run pays for math-verify, as new completions would
        total = 0.0
        for name, fn, _ in rewards:
            t = time.perf_counter()
            scores = call_reward(name, fn, prompts, completions, **cols)
            dt = time.perf_counter() - t
            total += dt
            if run:
                times[name].append(dt)
            if run == 0:
                print(f"{name:22s} mean reward {sum(scores) / len(scores):.3f}  (first run {dt:.3f}s)")
        if run:
            totals.append(total)
        else:
            print(f"first run total: {total:.3f}s")
    print(f"{len(completions)} completions, median of {args.runs} runs:")
    for name, ts in times.items():
        print(f"  {name:22s} {statistics.median(ts):.4f}s")
    print(f"  {'total':22s} {statistics.median(totals):.4f}s")


if __name__ == "__main__":
    main()
