"""Peak memory and seconds per GRPO step at real completion lengths, this repo's engine vs TRL's GRPOTrainer.

    .venv/bin/python benchmarks/grpo_memory.py --lengths 512,1024,2048 --json runs/bench/grpo_memory.json
    .venv/bin/python benchmarks/grpo_memory.py --smoke        # 64-token completions, a narrow model (seconds)

The model has Qwen2.5-0.5B's real architecture values where memory scales with them (vocabulary 151,936, 14 query
and 2 key/value heads of 64 dims, RoPE theta 1e6, tied embeddings) at reduced width and depth (hidden 128, 2 layers
by default), so the vocabulary projection and the attention are real-sized per token while the weights stay small.
Both sides get the same fixed rollout: one prompt of 32 tokens, G = 2 completions of exactly `completion_tokens`
random tokens each (no EOS), so generation is not measured and both train on the same max-length batch. Settings on
both sides: bf16 weights, gradient checkpointing, micro-batch 1 with accumulation over the group (one optimiser step),
beta 0.04 (k3 KL to a reference copy), per-sequence loss mean (TRL: loss_type="grpo"), lr 1e-6, AdamW, clip 1.0.
Ours runs its LM head and log-softmax over chunks of `logprob_chunk_size` positions (256 here; one of our config's
knobs), in tiles of 32k vocabulary rows on the CPU (`grpo.logprobs.ChunkedLMHead`); TRL 1.16 runs its own chunked LM
head (`trl.kernels.ChunkedLogProbFunction`: 32k-row tiles, fp32 gradient GEMMs on the CPU).

Each measurement runs in its own child process (glibc's mmap threshold fixed, `LIVE_MEMORY_ENV`): the policy is built, the peak resident set reset (/proc/self/
clear_refs) to the current one, then the trainer is set up and `steps` steps run; reported: the peak's growth over
that baseline (what training adds to the policy's weights: the reference copy, gradients, optimiser states,
activations, logits) and the median seconds per step after the first, wall-clock and the process's CPU time (one
thread: the CPU seconds change little with the machine's load, the wall-clock seconds a lot).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from grpo_vs_trl import peak_rss_mb, reset_peak_rss, rss_mb

# Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B): the values memory scales with per token
QWEN25_05B = {"vocab_size": 151_936, "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64,
              "rope_theta": 1_000_000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
PROMPT_TOKENS = 32
GENERATIONS = 2
BETA, LR = 0.04, 1e-6
CHUNK = 256  # our logprob_chunk_size
PAD = 151_643  # Qwen2.5's <|endoftext|>: EOS and padding
# glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, so later blocks of that size (a chunk
# of logits, a vocabulary-sized gradient) come from the heap, which keeps them after free: the resident set then grows
# with the number of chunks run, not with what is alive. A fixed threshold maps every block over 128 kB on its own and
# returns it on free, so the peak RSS follows the live tensors (here: flat from 256 to 1k tokens, where the dynamic
# threshold showed 300 kB more per token).
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def realistic_config(hidden: int = 128, layers: int = 2, max_positions: int = 8192):
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN25_05B, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
                       max_position_embeddings=max_positions, eos_token_id=PAD, pad_token_id=PAD,
                       bos_token_id=None)


def realistic_model(hidden: int = 128, layers: int = 2, max_positions: int = 8192):
    """Random weights, built in bf16 directly (an fp32 build first would raise the baseline's peak)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(realistic_config(hidden, layers, max_positions))
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = PAD
    return model


def fixed_tokens(completion_tokens: int, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, G completions' ids): random ids that are never EOS, so every completion has the full length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 150_000, (PROMPT_TOKENS + GENERATIONS * completion_tokens,), generator=g).tolist()
    rest = ids[PROMPT_TOKENS:]
    return ids[:PROMPT_TOKENS], [rest[i * completion_tokens : (i + 1) * completion_tokens] for i in range(GENERATIONS)]


class FixedRollout:
    """A rollout backend that returns the same completions of one prompt every step (right-padded to the longest;
    none ends with EOS)."""

    def __init__(self, prompt: list[int], completions: list[list[int]]):
        from grpo.rollout import Rollout

        n, T = len(completions), max(len(c) for c in completions)
        lengths = torch.tensor([len(c) for c in completions])
        ids = torch.full((n, T), PAD)
        for i, c in enumerate(completions):
            ids[i, : len(c)] = torch.tensor(c)
        self.rollout = Rollout(
            prompts=["p"] * n, prompt_ids=torch.tensor([prompt] * n),
            prompt_mask=torch.ones(n, len(prompt), dtype=torch.long), completion_ids=ids,
            completion_mask=(torch.arange(T) < lengths[:, None]).long(), completions=[f"c{i}" for i in range(n)],
            truncated=torch.ones(n, dtype=torch.bool), lengths=lengths, num_generations=n)

    def generate(self, prompts, num_generations, sampling, **kw):
        return self.rollout


def ours_config(completion_tokens: int, steps: int, **overrides):
    from grpo.config import GRPOConfig

    return GRPOConfig(**{
        "prompts_per_step": 1, "num_generations": GENERATIONS, "steps_per_iteration": steps, "mu": 1, "beta": BETA,
        "kl_estimator": "k3", "loss_aggregation": "sequence_mean", "learning_rate": LR, "lr_schedule": "constant",
        "warmup_steps": 0, "max_grad_norm": 1.0, "max_prompt_length": PROMPT_TOKENS,
        "max_completion_length": completion_tokens, "precision": "bf16", "gradient_checkpointing": True,
        "micro_batch_size": 1, "logprob_chunk_size": CHUNK, "seed": 0, **overrides})


def reward(prompts, completions, **kw):
    return [float(i % 2) for i in range(len(completions))]  # the two completions differ: a nonzero advantage


def measure_ours(completion_tokens: int, steps: int, hidden: int, layers: int, overrides: dict | None = None) -> dict:
    """Our GRPOTrainer on the fixed rollout: peak RSS growth over trainer setup and steps, seconds per step."""
    from grpo.trainer import GRPOTrainer

    model = realistic_model(hidden, layers, PROMPT_TOKENS + completion_tokens + 8)
    prompt, completions = fixed_tokens(completion_tokens)
    seconds, cpu_seconds = [], []

    def run():
        trainer = GRPOTrainer(model, None, ours_config(completion_tokens, steps, **(overrides or {})),
                              [{"prompt": "p"}], [("alternate", reward, 1.0)],
                              backend=FixedRollout(prompt, completions), progress=False)
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            (m,) = trainer.train(max_steps=1)
            seconds.append(time.perf_counter() - t)
            cpu_seconds.append(time.process_time() - c)
            assert m["skipped_steps"] == 0 and m["loss"] == m["loss"], m
    return measured(run, seconds, cpu_seconds)


def measure_trl(completion_tokens: int, steps: int, hidden: int, layers: int) -> dict:
    """TRL's GRPOTrainer on the same fixed rollout (through its `rollout_func` hook), the same settings; its reference
    model loads from a copy of the policy saved first, in bf16 as ours."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    from stages.core.tokenizer import train_tokenizer

    model = realistic_model(hidden, layers, PROMPT_TOKENS + completion_tokens + 8)
    prompt, completions = fixed_tokens(completion_tokens)
    tok = train_tokenizer(["a b c"], vocab_size=300)  # TRL decodes the ids for its reward call; it trains on the ids
    seconds, cpu_seconds, started = [], [], []

    def fixed_rollout(prompts, trainer):  # TRL's rollout hook: the same ids every step, no generation
        return {"prompt_ids": [list(prompt) for _ in prompts], "logprobs": None,
                "completion_ids": [list(completions[i % GENERATIONS]) for i in range(len(prompts))]}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            started.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            seconds.append(time.perf_counter() - started[-1][0])
            cpu_seconds.append(time.process_time() - started[-1][1])

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(f"{out}/policy")  # where TRL loads its reference model from
        model.config._name_or_path = f"{out}/policy"
        args = TRLConfig(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=GENERATIONS,
            num_generations=GENERATIONS, num_iterations=1, beta=BETA, epsilon=0.2, loss_type="grpo",
            scale_rewards="group", max_completion_length=completion_tokens, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", max_grad_norm=1.0, max_steps=steps,
            seed=0, bf16=True, gradient_checkpointing=True, use_cpu=True, report_to="none", save_strategy="no",
            eval_strategy="no", logging_steps=1, disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
            model_init_kwargs={"dtype": "bfloat16"})
        data = datasets.Dataset.from_list([{"prompt": "a b"}] * (steps * GENERATIONS))

        def run():
            TRLTrainer(model=model, processing_class=tok, args=args, reward_funcs=[reward], callbacks=[Clock()],
                       rollout_func=fixed_rollout, train_dataset=data).train()
        return measured(run, seconds, cpu_seconds)


def measured(run, seconds: list[float], cpu_seconds: list[float]) -> dict:
    """Run `run` (trainer setup and steps) after the model is built: the peak RSS's rise over the RSS before it."""
    before = rss_mb()
    exact = reset_peak_rss()  # else the peak since the process started (ru_maxrss), baseline included
    run()
    return {"peak_growth_mb": peak_rss_mb() - before, "rss_before_mb": before, "peak_reset": exact,
            "seconds": seconds, "s_per_step": statistics.median(seconds[1:] or seconds),
            "cpu_s_per_step": statistics.median(cpu_seconds[1:] or cpu_seconds)}


def child(side: str, completion_tokens: int, steps: int, hidden: int, layers: int, threads: int) -> dict:
    """One measurement in a fresh process (no allocator state or peak carried over from another)."""
    cmd = [sys.executable, __file__, "--child", side, "--lengths", str(completion_tokens), "--steps", str(steps),
           "--hidden", str(hidden), "--layers", str(layers), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **LIVE_MEMORY_ENV,
                                                                   "OMP_NUM_THREADS": str(threads)}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} at {completion_tokens} tokens failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096", help="completion lengths, comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="steps per measurement (the first is not timed)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sides", default="ours,trl")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="64-token completions, hidden 64, 1 layer, 2 steps")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        fn = measure_ours if a.child == "ours" else measure_trl
        print(json.dumps(fn(int(a.lengths), a.steps, a.hidden, a.layers)))
        return
    if a.smoke:
        a.lengths, a.steps, a.hidden, a.layers = "64", 2, 64, 1
    sides = a.sides.split(",")
    points = []
    for T in [int(x) for x in a.lengths.split(",")]:
        point = {"completion_tokens": T}
        for side in sides:
            r = child(side, T, a.steps, a.hidden, a.layers, a.threads)
            point[f"{side}_peak_mb"], point[f"{side}_s"] = r["peak_growth_mb"], r["s_per_step"]
            point[f"{side}_cpu_s"] = r["cpu_s_per_step"]
            point[f"{side}_peak_reset"] = r["peak_reset"]
            point[f"{side}_load_avg"] = os.getloadavg()[0]  # the machine's 1-minute load as the measurement ended
        if {"ours", "trl"} <= set(sides):
            point["peak_ratio"] = point["ours_peak_mb"] / point["trl_peak_mb"]
            point["speedup"] = point["trl_s"] / point["ours_s"]
            point["cpu_speedup"] = point["trl_cpu_s"] / point["ours_cpu_s"]
        points.append(point)
        print(json.dumps(point), flush=True)
    result = {"points": points, "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                                            "torch": torch.__version__, "cpus": os.cpu_count()},
              "shape": {**QWEN25_05B, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
                        "prompt_tokens": PROMPT_TOKENS, "generations": GENERATIONS, "micro_batch_size": 1,
                        "logprob_chunk_size": CHUNK},
              "settings": {"precision": "bf16", "gradient_checkpointing": True, "beta": BETA, "lr": LR,
                           "loss": "grpo (per-sequence mean)", "steps": a.steps},
              "target": "ours_peak_mb <= 0.7 x trl_peak_mb from 2048 tokens on, and ours_s <= trl_s"}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    print(f"{'tokens':>7} " + " ".join(f"{s + ' MB':>9} {s + ' s':>8}" for s in sides))
    for p in points:
        print(f"{p['completion_tokens']:>7} " + " ".join(f"{p[s + '_peak_mb']:>9.0f} {p[s + '_s']:>8.2f}"
                                                        for s in sides))


if __name__ == "__main__":
    main()
