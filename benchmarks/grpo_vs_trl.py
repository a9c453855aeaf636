"""A GRPO step, this repo's engine vs TRL's GRPOTrainer, on the same workload, alternating A/B in one process.

    .venv/bin/python benchmarks/grpo_vs_trl.py                # full run: A/B steps, cost curve, memory, table + JSON
    .venv/bin/python benchmarks/grpo_vs_trl.py --smoke        # two steps of each on a random-init mini model (seconds)

Workload (both sides): the `tiny` base model and tokenizer (built once into runs/bench/tiny_base, ~3-9 min), the
r1_zero prompts and rewards (accuracy + 0.5 x format) of the tiny recipe, B prompts x G generations, the same max
completion length, temperature, beta (k3 KL to the initial model), learning rate, per-sequence loss mean (TRL's
loss_type="grpo"), group-scaled advantages, one optimiser step per rollout (mu = 1), AdamW (0.9, 0.99), grad clip 1.0,
constant lr, fp32, and the same torch thread count. TRL: no eval, no saving, no gradient checkpointing (its default
is on; off is its faster setting here), no vLLM, report_to="none", logging every step (ours also computes every metric
every step). Each TRL step runs from TRL's own training loop; after it ends, a callback runs one step of ours, so the
two alternate and share the machine's noise.

Each seed (default 0, 1, 2) is a whole A/B run; one trajectory can reach an accuracy threshold ten steps earlier or
later than another by chance alone, so the steps and seconds to the threshold (and held-out pass@1) are averaged over
the seeds, and the timings pooled.

Reported: median and spread of seconds per step, generated tokens per second, the split of a step (generation,
rewards, frozen log-probs, policy forward + loss, backward + optimiser, other), peak resident memory (each side alone
in a child process, and per step in the A/B process), the sampled accuracy of the training batches, steps and seconds
until the mean accuracy over 10 steps reaches a threshold, held-out pass@1 after the run, a model FLOP count per step
and the achieved fraction of this machine's measured matmul throughput, and a cost curve over G and the completion
length (random-init model of the same shape, so completions run to the max length).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: a waiting OpenMP thread sleeps instead of spinning. On a machine whose cores are shared
# with other work, spinning threads made 2-thread steps up to 10x slower for both sides alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "runs" / "bench" / "tiny_base"
PHASES = ("generate", "rewards", "reference", "forward", "backward", "other")


@dataclass
class Workload:
    prompts_per_step: int = 16  # B
    num_generations: int = 8  # G
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.04
    learning_rate: float = 2e-4
    steps: int = 100
    threads: int = 2
    seed: int = 0

    def ours(self):
        from grpo import GRPOConfig

        return GRPOConfig(
            prompts_per_step=self.prompts_per_step, num_generations=self.num_generations, iterations=1,
            steps_per_iteration=max(self.steps, 1), mu=1, beta=self.beta, kl_estimator="k3", epsilon=0.2,
            loss_aggregation="sequence_mean", scale_rewards="group", temperature=self.temperature, top_p=1.0,
            max_prompt_length=128, max_completion_length=self.max_completion_length,
            learning_rate=self.learning_rate, lr_schedule="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99,
            weight_decay=0.0, max_grad_norm=1.0, seed=self.seed, log_every=1,
        )

    def trl(self, output_dir: str):
        from trl import GRPOConfig as TRLConfig

        return TRLConfig(
            output_dir=output_dir, per_device_train_batch_size=self.prompts_per_step * self.num_generations,
            gradient_accumulation_steps=1, num_generations=self.num_generations, num_iterations=1, beta=self.beta,
            epsilon=0.2, loss_type="grpo", scale_rewards="group", temperature=self.temperature, top_p=1.0, top_k=0,
            max_completion_length=self.max_completion_length, learning_rate=self.learning_rate,
            lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
            optim="adamw_torch", max_grad_norm=1.0, max_steps=self.steps, seed=self.seed, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
            logging_steps=1, disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
            reward_weights=None,  # set by the caller, in the order of the reward functions
        )


# ---------------------------------------------------------------------------------------------- model and data


def build_mini_model(out: Path, hidden: int = 32, layers: int = 1) -> Path:
    """A random-init Qwen2 model and a tokenizer trained on a few hundred problems: the --smoke workload."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stages.core.tasks import clean_trace, make_problems
    from stages.core.tokenizer import train_tokenizer

    problems = make_problems("addition", 300, seed=0)
    tok = train_tokenizer([f"User: {p.question}\nAssistant: {clean_trace(p)}" for p in problems], vocab_size=512)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_init_like(src: Path, out: Path) -> Path:
    """Same config and tokenizer as `src`, fresh random weights (for the cost curve: completions rarely stop early)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def ensure_base_model(path: Path) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from stages.base_model import build_base_model
    from stages.core.recipe import load_recipe

    print(f"building the tiny base model into {path} (once; about 3 minutes on 2 idle cores) ...", flush=True)
    res = build_base_model(load_recipe("tiny"), path, progress=False)
    print(f"  {res.num_parameters:,} parameters, {res.steps} steps, {res.seconds:.0f} s", flush=True)
    return path


def load(path: Path):
    from stages.core.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(path), "cpu", False)
    return model, tok


def workload_rows(n: int | None = None) -> tuple[list[dict], list]:
    """The tiny recipe's r1_zero prompts (train split) and its reward functions (name, fn, weight)."""
    from stages.core.grpo_runner import reward_functions, train_rows
    from stages.core.recipe import load_recipe

    recipe = load_recipe("tiny")
    rows = train_rows(recipe, recipe.r1_zero)
    for r in rows:  # a flat string column, so that TRL's datasets.Dataset holds every row the same way
        r["metadata"] = json.dumps(r["metadata"]) if not isinstance(r["metadata"], str) else r["metadata"]
    return (rows[:n] if n else rows), reward_functions(recipe, recipe.r1_zero)


# ---------------------------------------------------------------------------------------------- measuring


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def matmul_gflops(threads: int, n: int = 1024, shape: tuple[int, int, int] | None = None, reps: int = 10) -> float:
    """Measured fp32 matmul throughput (best of `reps`), as the ceiling the achieved FLOP rate is compared with."""
    torch.set_num_threads(threads)
    m, k, nn = shape or (n, n, n)
    a, b = torch.randn(m, k), torch.randn(k, nn)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * nn / best / 1e9


def model_flops(config, prompt_lens: list[int], completion_lens: list[int]) -> dict[str, float]:
    """FLOPs of one GRPO step on real tokens (padding excluded: the same useful work for both sides).

    Per token and layer: 2 x the projection weights (q, k, v, o, gate, up, down) plus causal attention
    2 x 2 x heads x head_dim x (keys attended); the LM head 2 x hidden x vocab on positions whose logits are used.
    Generation: prefill of the prompt plus one cached forward per later completion token; training: forward of
    prompt + completion, backward = 2 x forward; the reference model: one forward.
    """
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or H // nh
    inter = config.intermediate_size
    proj = 2 * (H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 3 * H * inter)  # per token per layer
    att = 4 * nh * hd  # per token per layer per key
    head = 2 * H * V

    def fwd(n_tokens: int, start: int = 0) -> float:  # tokens at positions start+1 .. start+n_tokens (keys = position)
        keys = n_tokens * start + n_tokens * (n_tokens + 1) / 2
        return L * (proj * n_tokens + att * keys)

    gen = train_fwd = 0.0
    for p, c in zip(prompt_lens, completion_lens):
        gen += fwd(p) + head + fwd(max(c - 1, 0), p) + head * max(c - 1, 0)
        train_fwd += fwd(p + c) + head * c
    return {"generation": gen, "policy_forward": train_fwd, "backward": 2 * train_fwd, "reference": train_fwd,
            "total": gen + 4 * train_fwd}


@dataclass
class SideLog:
    """Per-step records of one side."""

    name: str
    seconds: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    step_peak_rss_mb: list[float] = field(default_factory=list)
    step_rss_growth_mb: list[float] = field(default_factory=list)


def threshold_crossing(log: SideLog, threshold: float, window: int) -> tuple[int, float] | None:
    """(steps, seconds) until the mean batch accuracy over `window` steps first reaches `threshold`, or None."""
    for i in range(window - 1, len(log.accuracy)):
        if sum(log.accuracy[i - window + 1 : i + 1]) / window >= threshold:
            return i + 1, sum(log.seconds[: i + 1])
    return None


def summarize(logs: list[SideLog], warmup: int, threshold: float, window: int) -> dict:
    """One side over one or more seeds: timings pooled over every seed's steps (past `warmup`), accuracy and the
    threshold crossing per seed, then averaged (a crossing is reported only when every seed reached it)."""

    def timed(values: list) -> list:
        return [v for log_values in values for v in (log_values[warmup:] or log_values)]

    sec = timed([log.seconds for log in logs])
    med = statistics.median(sec)
    q = statistics.quantiles(sec, n=4, method="inclusive") if len(sec) >= 2 else [sec[0]] * 3
    toks = [t / s for log in logs for t, s in zip(log.completion_tokens[warmup:], log.seconds[warmup:])] or [0.0]
    phases_all = timed([log.phases for log in logs])
    phases = {k: statistics.median([p.get(k, 0.0) for p in phases_all]) for k in PHASES}
    crossings = [threshold_crossing(log, threshold, window) for log in logs]
    reached = all(crossings)
    flops_all = timed([log.flops for log in logs])
    flops = statistics.median(flops_all) if flops_all else 0.0
    acc = [a for log in logs for a in log.accuracy]
    last = [a for log in logs for a in log.accuracy[-window:]]
    first = [log.accuracy[0] for log in logs if log.accuracy]
    peaks = [v for log in logs for v in log.step_peak_rss_mb]
    growth = [v for log in logs for v in log.step_rss_growth_mb]
    return {
        "seeds": len(logs),
        "steps": len(logs[0].seconds),
        "median_s_per_step": med,
        "p25_s_per_step": q[0],
        "p75_s_per_step": q[2],
        "min_s_per_step": min(sec),
        "max_s_per_step": max(sec),
        "gen_tokens_per_s": statistics.median(toks),
        "phases_median_s": phases,
        "accuracy_first": sum(first) / len(first) if first else None,
        "accuracy_mean_all": sum(acc) / len(acc) if acc else None,
        "accuracy_last_window": sum(last) / len(last) if last else None,
        "steps_to_threshold_per_seed": [c[0] if c else None for c in crossings],
        "seconds_to_threshold_per_seed": [c[1] if c else None for c in crossings],
        "steps_to_threshold": statistics.mean(c[0] for c in crossings) if reached else None,
        "seconds_to_threshold": statistics.mean(c[1] for c in crossings) if reached else None,
        "total_seconds": sum(sum(log.seconds) for log in logs),
        "model_flops_per_step": flops,
        "achieved_gflops": flops / med / 1e9 if flops else 0.0,
        "ab_step_peak_rss_mb": max(peaks) if peaks else None,
        "ab_step_rss_growth_mb": max(growth) if growth else None,
    }


# ---------------------------------------------------------------------------------------------- the two sides


class Ours:
    """This repo's GRPOTrainer, stepped one train_step at a time."""

    def __init__(self, model_dir: Path, work: Workload, rows: list[dict], rewards: list):
        from grpo import GRPOTrainer

        model, self.tok = load(model_dir)
        self.trainer = GRPOTrainer(model, self.tok, work.ours(), rows, rewards, progress=False)
        self.trainer.reference = self.trainer.engine.make_reference()  # what train() does at the start of an iteration
        self.log = SideLog("ours")
        self.config = model.config
        backend = self.trainer.backend
        self._generate, self.last = backend.generate, None

        def generate(*a, **k):
            self.last = self._generate(*a, **k)
            return self.last

        backend.generate = generate

    def step(self, threads: int) -> None:
        torch.set_num_threads(threads)
        before = rss_mb()
        reset_peak_rss()
        t = time.perf_counter()
        m = self.trainer.train_step()
        sec = time.perf_counter() - t
        self.trainer.global_step += 1
        self.log.step_peak_rss_mb.append(peak_rss_mb())
        self.log.step_rss_growth_mb.append(peak_rss_mb() - before)
        self.log.seconds.append(sec)
        phases = {k: m.get(f"time/{k}", 0.0) for k in PHASES[:-1]}
        phases["other"] = sec - sum(phases.values())
        self.log.phases.append(phases)
        self.log.accuracy.append(m.get("accuracy", m.get("reward/accuracy/mean", 0.0)))
        r = self.last
        self.log.completion_tokens.append(int(r.lengths.sum()))
        self.log.flops.append(model_flops(self.config, r.prompt_mask.sum(1).tolist(), r.lengths.tolist())["total"])

    def final_model(self):
        return self.trainer.engine.module


class TRLSide:
    """trl.GRPOTrainer; its own loop drives the run, and a callback hands every other step to `between`."""

    def __init__(self, model_dir: Path, work: Workload, rows: list[dict], rewards: list, output_dir: str):
        import datasets
        from transformers import TrainerCallback
        from trl import GRPOTrainer as TRLTrainer

        self.log = SideLog("trl")
        self.work = work
        self.batch_accuracy: list[float] = []
        model, self.tok = load(model_dir)
        self.config = model.config
        funcs, weights = [], []
        for name, fn, weight in rewards:
            funcs.append(self._reward(name, fn))
            weights.append(weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = work.trl(output_dir)
        args.reward_weights = weights
        data = datasets.Dataset.from_list(rows)
        side = self

        class Alternate(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kw):
                side.t_opt += time.perf_counter() - side.t_train_step_end

            def on_step_end(self, args, state, control, **kw):
                side.step_ended()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = TRLTrainer(model=model, processing_class=self.tok, args=args, train_dataset=data,
                                      reward_funcs=funcs, callbacks=[Alternate()])
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        self.trainer.remove_callback(PrinterCallback)  # the log dicts it prints every step
        self.trainer.remove_callback(ProgressCallback)
        self._instrument()
        self.between = None  # called after each TRL step (runs ours)

    def _reward(self, name, fn):
        columns = ("question", "answer", "task", "metadata", "prompt_id")

        def reward(prompts, completions, **kw):
            out = fn(prompts, completions, **{k: kw[k] for k in columns if k in kw})
            if name == "accuracy":
                self.batch_accuracy.append(sum(out) / len(out))
            return out

        reward.__name__ = name
        return reward

    def _instrument(self):
        tr = self.trainer
        self.phase = dict.fromkeys(PHASES[:-1], 0.0)
        self.t_opt = 0.0
        self.t_train_step_end = 0.0

        def timed(obj, attr, key, when=None):
            fn = getattr(obj, attr)

            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    if when is None or when():
                        self.phase[key] += time.perf_counter() - t

            setattr(obj, attr, wrapper)

        timed(tr, "_generate", "generate")
        timed(tr, "_calculate_rewards", "rewards")
        timed(tr, "_get_per_token_logps_and_entropies", "reference", when=lambda: not torch.is_grad_enabled())
        timed(tr, "compute_loss", "forward")
        timed(tr.accelerator, "backward", "backward")
        gen = tr._generate

        def capture(prompts):
            out = gen(prompts)
            self.last_lengths = ([len(p) for p in out[0]], [len(c) for c in out[1]])
            return out

        tr._generate = capture
        ts = tr.training_step

        def training_step(*a, **k):
            try:
                return ts(*a, **k)
            finally:
                self.t_train_step_end = time.perf_counter()

        tr.training_step = training_step

    def run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.threads = threads
        self.mark()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer.train()

    def mark(self) -> None:
        """Start of a TRL step (the end of our previous one)."""
        torch.set_num_threads(self.work.threads)
        self.phase = dict.fromkeys(PHASES[:-1], 0.0)
        self.t_opt = 0.0
        self.rss_before = rss_mb()
        reset_peak_rss()
        self.t0 = time.perf_counter()

    def step_ended(self) -> None:
        sec = time.perf_counter() - self.t0
        log = self.log
        log.step_peak_rss_mb.append(peak_rss_mb())
        log.step_rss_growth_mb.append(peak_rss_mb() - self.rss_before)
        log.seconds.append(sec)
        phases = dict(self.phase)
        phases["backward"] += self.t_opt
        phases["other"] = sec - sum(phases.values())
        log.phases.append(phases)
        log.accuracy.append(self.batch_accuracy[-1] if self.batch_accuracy else 0.0)
        plens, clens = self.last_lengths
        log.completion_tokens.append(sum(clens))
        log.flops.append(model_flops(self.config, plens, clens)["total"])
        if self.between is not None:
            self.between()
        self.mark()

    def final_model(self):
        return self.trainer.model


# ---------------------------------------------------------------------------------------------- runs


def ab_run(model_dir: Path, work: Workload, rows, rewards, quiet: bool = False) -> tuple[SideLog, SideLog, dict]:
    """Alternate TRL and ours step by step; returns both logs and the two trained models."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(work.threads)
        ours = Ours(model_dir, work, rows, rewards)
        trl_side = TRLSide(model_dir, work, rows, rewards, tmp)
        n = {"i": 0}

        def between():
            ours.step(work.threads)
            n["i"] += 1
            if not quiet and (n["i"] % 10 == 0 or n["i"] == work.steps):
                print(f"  step {n['i']}/{work.steps}: trl {trl_side.log.seconds[-1]:.2f} s, "
                      f"ours {ours.log.seconds[-1]:.2f} s; batch accuracy trl {trl_side.log.accuracy[-1]:.2f}, "
                      f"ours {ours.log.accuracy[-1]:.2f}", flush=True)

        trl_side.between = between
        trl_side.run(work.threads)
        return ours.log, trl_side.log, {"ours": ours.final_model(), "trl": trl_side.final_model(), "tok": ours.tok}


def heldout_eval(models: dict, n_prompts: int = 128, samples: int = 4) -> dict[str, float]:
    """Held-out pass@1 and greedy accuracy of both trained models, with the same evaluation code."""
    from stages.core.evaluate import evaluate
    from stages.core.heldout import heldout_problems
    from stages.core.recipe import load_recipe

    recipe = load_recipe("tiny")
    cfg = recipe.eval.model_copy(update={"num_prompts": n_prompts, "samples_per_prompt": samples})
    problems = heldout_problems(recipe, n_prompts)
    out = {}
    for side in ("ours", "trl"):
        res = evaluate(models[side], models["tok"], problems, cfg, recipe.prompt)
        out[side] = {"pass_at_1": res.pass_at_1, "greedy_accuracy": res.greedy_accuracy,
                     "format_rate": res.format_rate}
    return out


def cost_curve(model_dir: Path, work: Workload, rows, rewards, gs, lengths, steps: int) -> list[dict]:
    """Median s/step of both sides for each (G, max completion length), on a random-init model of the same shape."""
    out = []
    for g in gs:
        for length in lengths:
            w = replace(work, num_generations=g, max_completion_length=length, steps=steps + 1)
            ours, trl_log, _ = ab_run(model_dir, w, rows, rewards, quiet=True)
            row = {"G": g, "max_completion_length": length,
                   "ours_s": statistics.median(ours.seconds[1:]), "trl_s": statistics.median(trl_log.seconds[1:]),
                   "ours_tokens": statistics.median(ours.completion_tokens[1:]),
                   "trl_tokens": statistics.median(trl_log.completion_tokens[1:])}
            row["speedup"] = row["trl_s"] / row["ours_s"]
            print(f"  G={g:>2} T={length:>3}: trl {row['trl_s']:.2f} s, ours {row['ours_s']:.2f} s "
                  f"({row['speedup']:.2f}x)", flush=True)
            out.append(row)
    return out


def standalone_memory(side: str, model_dir: Path, work: Workload, steps: int) -> dict:
    """Peak RSS of one side alone in a child process (`--only`), as a user running it would see."""
    cmd = [sys.executable, __file__, "--only", side, "--model", str(model_dir), "--steps", str(steps),
           "--threads", str(work.threads), "--prompts", str(work.prompts_per_step), "--generations",
           str(work.num_generations), "--max-completion-length", str(work.max_completion_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"memory child for {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def only(side: str, model_dir: Path, work: Workload) -> None:
    """Child process: one side alone, for its peak memory."""
    torch.set_num_threads(work.threads)
    rows, rewards = workload_rows()
    setup_peak = peak_rss_mb()
    if side == "ours":
        s = Ours(model_dir, work, rows, rewards)
        s.step(work.threads)  # warm
        before = rss_mb()
        reset_peak_rss()
        for _ in range(work.steps):
            s.step(work.threads)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            s = TRLSide(model_dir, replace(work, steps=work.steps + 1), rows, rewards, tmp)
            state = {"n": 0, "before": None}

            def between():
                state["n"] += 1
                if state["n"] == 1:  # after the warm step
                    state["before"] = rss_mb()
                    reset_peak_rss()

            s.between = between
            s.run(work.threads)
            before = state["before"]
    print(json.dumps({"side": side, "peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": before,
                      "setup_peak_rss_mb": setup_peak, "steps": work.steps}))


# ---------------------------------------------------------------------------------------------- report


def trl_config_dict(work: Workload) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: str(v) for k, v in work.trl("<tmp>").to_dict().items()}


def ratio_lines(ours: dict, trl: dict, mem: dict | None, heldout: dict | None, threshold: float,
                paired: float) -> list[dict]:
    speed = trl["median_s_per_step"] / ours["median_s_per_step"]
    lines = [{"target": "steps/s >= 2.0x TRL's (ratio of medians; median of paired ratios)",
              "value": f"{speed:.2f}x; {paired:.2f}x", "met": speed >= 2.0 and paired >= 2.0}]
    if mem:
        o, t = mem["ours"]["peak_rss_mb"], mem["trl"]["peak_rss_mb"]
        lines.append({"target": "peak memory <= TRL's (alone in a process)", "value": f"{o:.0f} vs {t:.0f} MB",
                      "met": o <= t})
        o2 = mem["ours"]["peak_rss_mb"] - mem["ours"]["rss_before_steps_mb"]
        t2 = mem["trl"]["peak_rss_mb"] - mem["trl"]["rss_before_steps_mb"]
        lines.append({"target": "  (info, allocator-dependent) step peak above the pre-step RSS",
                      "value": f"{o2:.0f} vs {t2:.0f} MB", "met": None})
    if ours["seconds_to_threshold"] and trl["seconds_to_threshold"]:
        r = ours["seconds_to_threshold"] / trl["seconds_to_threshold"]
        lines.append({"target": f"time to accuracy {threshold:.2f} <= 0.5x TRL's",
                      "value": f"{ours['seconds_to_threshold']:.0f} vs {trl['seconds_to_threshold']:.0f} s "
                               f"({r:.2f}x)", "met": r <= 0.5})
    else:
        lines.append({"target": f"time to accuracy {threshold:.2f} <= 0.5x TRL's",
                      "value": f"steps to reach: ours {ours['steps_to_threshold']}, trl {trl['steps_to_threshold']}",
                      "met": bool(ours["steps_to_threshold"]) and not trl["steps_to_threshold"]})
    a, b = ours["accuracy_mean_all"], trl["accuracy_mean_all"]
    lines.append({"target": "accuracy per step >= TRL's (mean over all steps, 0.02 noise margin)",
                  "value": f"{a:.3f} vs {b:.3f}", "met": a >= b - 0.02})
    if heldout:
        a, b = heldout["ours"]["pass_at_1"], heldout["trl"]["pass_at_1"]
        lines.append({"target": "held-out pass@1 after the run >= TRL's (0.02 margin)", "value": f"{a:.3f} vs {b:.3f}",
                      "met": a >= b - 0.02})
    return lines


def _per_seed(side: dict) -> str:
    return " ".join("-" if v is None else str(v) for v in side["steps_to_threshold_per_seed"])


def print_report(result: dict) -> None:
    o, t = result["ours"], result["trl"]
    w = result["workload"]
    print()
    print(f"GRPO step, ours vs TRL {result['versions']['trl']} — B={w['prompts_per_step']} x G={w['num_generations']}, "
          f"<= {w['max_completion_length']} new tokens, {w['steps']} steps x seeds {result['seeds']}, {w['threads']} threads, "
          f"model {result['model']['parameters']:,} params")
    rows = [
        ("s/step median", "median_s_per_step", "{:.3f}"),
        ("s/step p25 .. p75", None, None),
        ("s/step min .. max", None, None),
        ("generated tokens/s", "gen_tokens_per_s", "{:.0f}"),
        ("batch accuracy, first step", "accuracy_first", "{:.3f}"),
        ("batch accuracy, mean of all steps", "accuracy_mean_all", "{:.3f}"),
        ("batch accuracy, last 10 steps", "accuracy_last_window", "{:.3f}"),
        (f"steps to accuracy {result['threshold']:.2f} (10-step mean)", "steps_to_threshold", "{:.1f}"),
        ("seconds to that accuracy", "seconds_to_threshold", "{:.0f}"),
        ("model GFLOP per step", None, None),
        ("achieved GFLOP/s", "achieved_gflops", "{:.1f}"),
        ("  fraction of measured matmul peak", None, None),
        ("A/B process: peak RSS during a step (MB)", "ab_step_peak_rss_mb", "{:.0f}"),
    ]
    print(f"{'':44s} {'ours':>14s} {'TRL':>14s} {'TRL/ours':>9s}")
    peak = result["machine"]["matmul_gflops"]
    for label, key, fmt in rows:
        if key is None:
            if label.startswith("s/step p25"):
                a, b = f"{o['p25_s_per_step']:.2f}..{o['p75_s_per_step']:.2f}", \
                    f"{t['p25_s_per_step']:.2f}..{t['p75_s_per_step']:.2f}"
            elif label.startswith("s/step min"):
                a, b = f"{o['min_s_per_step']:.2f}..{o['max_s_per_step']:.2f}", \
                    f"{t['min_s_per_step']:.2f}..{t['max_s_per_step']:.2f}"
            elif label.startswith("model GFLOP"):
                a, b = f"{o['model_flops_per_step'] / 1e9:.1f}", f"{t['model_flops_per_step'] / 1e9:.1f}"
            else:
                a, b = f"{o['achieved_gflops'] / peak:.1%}", f"{t['achieved_gflops'] / peak:.1%}"
            print(f"{label:44s} {a:>14s} {b:>14s}")
            continue
        va, vb = o.get(key), t.get(key)
        a = fmt.format(va) if va is not None else "-"
        b = fmt.format(vb) if vb is not None else "-"
        r = f"{vb / va:.2f}" if isinstance(va, float) and isinstance(vb, float) and va else ""
        print(f"{label:44s} {a:>14s} {b:>14s} {r:>9s}")
    print(f"{'  per seed (steps to the threshold)':44s} {_per_seed(o):>14s} {_per_seed(t):>14s}")
    ps = result["paired_speedup"]
    print(f"{'TRL/ours per back-to-back pair: median (min..max)':44s} {ps['median']:.2f} ({ps['min']:.2f}..{ps['max']:.2f})")
    print("\nwhere a step's time goes (median seconds)")
    print(f"{'':44s} {'ours':>14s} {'TRL':>14s}")
    for k in PHASES:
        print(f"{'  ' + k:44s} {o['phases_median_s'][k]:>14.3f} {t['phases_median_s'][k]:>14.3f}")
    if result.get("memory"):
        m = result["memory"]
        print("\npeak resident memory, each side alone in a process (MB)")
        for side in ("ours", "trl"):
            d = m[side]
            print(f"  {side:6s} peak {d['peak_rss_mb']:.0f}, before the steps {d['rss_before_steps_mb']:.0f}, "
                  f"step peak above that {d['peak_rss_mb'] - d['rss_before_steps_mb']:.0f}")
    if result.get("heldout"):
        h = result["heldout"]
        print(f"\nheld-out pass@1 after the run (mean of {len(result['seeds'])} seeds): ours {h['ours']['pass_at_1']:.3f}, trl {h['trl']['pass_at_1']:.3f} "
              f"(greedy {h['ours']['greedy_accuracy']:.3f} vs {h['trl']['greedy_accuracy']:.3f})")
    if result.get("curve"):
        print("\ncost curve (random-init model, completions run to the max length): median s/step")
        print(f"  {'G':>3s} {'T':>4s} {'ours':>8s} {'TRL':>8s} {'TRL/ours':>9s}")
        for r in result["curve"]:
            print(f"  {r['G']:>3d} {r['max_completion_length']:>4d} {r['ours_s']:>8.2f} {r['trl_s']:>8.2f} "
                  f"{r['speedup']:>9.2f}")
    print("\ntargets")
    for line in result["targets"]:
        tag = "info" if line["met"] is None else "met" if line["met"] else "NOT met"
        print(f"  [{tag:7s}] {line['target']}: {line['value']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="2 steps on a random-init mini model; no curve/memory/eval")
    p.add_argument("--model", type=Path, default=None, help=f"model dir (default {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--steps", type=int, default=None, help="A/B steps (default 100; smoke 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16, help="B")
    p.add_argument("--generations", type=int, default=8, help="G")
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threshold", type=float, default=0.7, help="batch accuracy (10-step mean) to time")
    p.add_argument("--warmup", type=int, default=2, help="steps of each side left out of the timing medians")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, one A/B run each (default 0,1,2; smoke 0): timings are pooled, "
                        "steps and seconds to the accuracy threshold averaged over seeds (one trajectory crosses "
                        "a threshold up to ~10 steps earlier or later by chance alone)")
    p.add_argument("--curve-gs", default="4,8,16")
    p.add_argument("--curve-lengths", default="32,64,128")
    p.add_argument("--curve-steps", type=int, default=2)
    p.add_argument("--no-curve", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default runs/bench/grpo_vs_trl.json)")
    p.add_argument("--only", choices=("ours", "trl"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.seeds = a.seeds or ("0" if a.smoke else "0,1,2")

    smoke = a.smoke
    work = Workload(prompts_per_step=2 if smoke else a.prompts, num_generations=4 if smoke else a.generations,
                    max_completion_length=16 if smoke else a.max_completion_length, beta=a.beta,
                    learning_rate=a.lr, steps=a.steps or (2 if smoke else 100), threads=a.threads)
    torch.set_num_threads(work.threads)
    tmp = tempfile.TemporaryDirectory()
    if smoke:
        model_dir = build_mini_model(Path(tmp.name) / "mini")
        a.no_curve = a.no_memory = a.no_eval = True
    else:
        model_dir = ensure_base_model(a.model or DEFAULT_MODEL)
    if a.only:
        only(a.only, model_dir, work)
        return {}

    import transformers
    import trl

    rows, rewards = workload_rows(200 if smoke else None)
    peak_before = max(matmul_gflops(work.threads) for _ in range(2))
    seeds = [int(x) for x in a.seeds.split(",")]
    ours_logs, trl_logs, heldouts = [], [], []
    for seed in seeds:
        print(f"A/B, seed {seed}: {work.steps} steps of each side, alternating (TRL step, then ours) ...", flush=True)
        ours_log, trl_log, models = ab_run(model_dir, replace(work, seed=seed), rows, rewards, quiet=smoke)
        ours_logs.append(ours_log)
        trl_logs.append(trl_log)
        if not a.no_eval:
            print(f"held-out evaluation of both models trained with seed {seed} ...", flush=True)
            heldouts.append(heldout_eval(models))
        n_params = sum(p.numel() for p in models["ours"].parameters())
        del models
    peak_after = max(matmul_gflops(work.threads) for _ in range(2))
    warmup = 0 if work.steps <= a.warmup else a.warmup
    result = {
        "workload": asdict(work),
        "threshold": a.threshold,
        "seeds": seeds,
        "model": {"path": str(model_dir), "parameters": n_params},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "machine": {"cpus": os.cpu_count(), "threads": work.threads,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "matmul_gflops": max(peak_before, peak_after),
                    "matmul_gflops_before_after": [peak_before, peak_after],
                    "model_shaped_matmul_gflops": matmul_gflops(work.threads, shape=(4096, 128, 384))},
        "ours": summarize(ours_logs, warmup, a.threshold, 10),
        "trl": summarize(trl_logs, warmup, a.threshold, 10),
        "per_step": {"ours": [asdict(x) for x in ours_logs], "trl": [asdict(x) for x in trl_logs]},
        "config": {
            "ours": work.ours().model_dump(),
            "trl": trl_config_dict(work),
            "notes": "TRL: gradient checkpointing off, fp32, no eval/saving/vLLM; ours: fast decoding on "
                     "(grpo.fast.sample), shared-prompt packed log-probs (grpo.fast.shared_prompt_logprobs)",
        },
    }
    if heldouts:  # the mean over seeds of each side's held-out numbers
        result["heldout"] = {side: {k: statistics.mean(h[side][k] for h in heldouts) for k in heldouts[0][side]}
                             for side in ("ours", "trl")}
        result["heldout_per_seed"] = heldouts
    if not a.no_memory:
        print("peak memory, each side alone ...", flush=True)
        result["memory"] = {s: standalone_memory(s, model_dir, work, 3) for s in ("ours", "trl")}
    if not a.no_curve:
        print("cost curve ...", flush=True)
        curve_dir = random_init_like(model_dir, Path(tmp.name) / "random_init")
        result["curve"] = cost_curve(curve_dir, work, rows, rewards, [int(x) for x in a.curve_gs.split(",")],
                                     [int(x) for x in a.curve_lengths.split(",")], a.curve_steps)
    pairs = [t / o for tl, ol in zip(trl_logs, ours_logs) for t, o in zip(tl.seconds[warmup:], ol.seconds[warmup:])]
    result["paired_speedup"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs),
                                "note": "TRL step i / our step i, run back to back: the A/B ratio least hurt by noise"}
    result["targets"] = ratio_lines(result["ours"], result["trl"], result.get("memory"), result.get("heldout"),
                                    a.threshold, result["paired_speedup"]["median"])
    print_report(result)
    out = a.json or (None if smoke else ROOT / "runs" / "bench" / "grpo_vs_trl.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nJSON: {out}")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
