"""GRPO at real shapes on one CUDA GPU: the prepared script a session with a lent GPU runs once, in under 8 minutes.

    python3 benchmarks/gpu_check.py                  # Qwen2.5-0.5B and 1.5B shapes, bf16, HF generate and fast decoder
    python3 benchmarks/gpu_check.py --smoke          # the same parts on CPU with tiny shapes (seconds): plumbing only

Each part is one model shape x one rollout path (Hugging Face `generate`, the fast static-KV decoder), run as full
GRPOTrainer steps (rollout, constant reward, reference and policy log-probs, backward, AdamW) on random-init weights
and uniform random prompt ids, so completions run to the max length. A part's steps stop when its share of the time
budget would be overrun; a part that cannot time one step is recorded as skipped, with why. Recorded per part:
seconds per step, generated tokens per second (generation time only), MFU (model FLOPs of the step's real tokens from
the shapes, see benchmarks/grpo_vs_trl.model_flops, / step time / peak), peak GPU memory, and the max |Δ| over
completion tokens between the sampler's log-probs (the fast decoder does not expose its own, so the Hugging Face
forward on the sampled tokens at sampling time) and the trainer's log-probs on the same weights.

Needs torch, transformers, tokenizers and pydantic only (no MLflow, Prefect, DeepSpeed, vLLM, datasets).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.grpo_vs_trl import model_flops

# Architecture values of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B (their config.json on the Hugging Face hub);
# max_position_embeddings only sizes the rotary table, so it is left at the Qwen2 default.
QWEN25 = {
    "qwen2.5-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True},
}
QWEN25_EOS = 151643  # <|endoftext|>: EOS and padding of the Qwen2.5 base models
SMOKE_SHAPE = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True}
ROLLOUTS = ("fast", "hf")  # the fast static-KV decoder; Hugging Face generate
H200_BF16_PEAK = 790e12  # dense bf16 FLOP/s taken as the MFU denominator


def id_tokenizer(vocab_size: int, eos_id: int):
    """A word-level tokenizer whose words are token ids ("t17 t4 ..."): random prompts tokenize to exactly the ids
    drawn, and completions decode to text (for the reward) at the real vocabulary size. EOS doubles as padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<|endoftext|>"] = vocab.pop(f"t{eos_id}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_prompts(n: int, length: int, vocab_size: int, eos_id: int, seed: int) -> list[dict]:
    """n prompts of `length` ids drawn uniformly (EOS excluded), as dataset rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size - 1, (length,), generator=g)
        ids[ids >= eos_id] += 1
        rows.append({"prompt": " ".join(f"t{i}" for i in ids.tolist())})
    return rows


def length_reward(prompts, completions, **_):
    """Completion length in words / 1000: a cheap reward with some spread (random-init models rarely stop)."""
    return [len(c.split()) / 1000 for c in completions]


def build_model(shape: dict, eos_id: int, device: str, seed: int):
    """A random-init Qwen2ForCausalLM of `shape`, built on `device` (the trainer casts it to bf16)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**shape, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id)
    with torch.device(device):
        return transformers.Qwen2ForCausalLM(config)


def peak_mb(device: str) -> float:
    """Peak GPU memory allocated by torch since the last reset; on CPU, the process's peak resident memory."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def logprob_gap(trainer, rollout, rows_per_pass: int) -> float:
    """max |Δ| over completion tokens between the Hugging Face forward on the sampled sequences (what the sampler's
    distribution was, on the same weights) and the trainer's log-probs (the fast shared-prompt pass where it runs)."""
    from grpo.logprobs import completion_logprobs

    model, T, gap = trainer.engine.module, rollout.completion_ids.shape[1], 0.0
    was_training = model.training
    model.eval()
    for s in range(0, rollout.completion_ids.shape[0], rows_per_pass):
        rows = slice(s, s + rows_per_pass)
        sampler, _ = completion_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows], T,
                                         trainer.cfg.temperature, trainer.cfg.logprob_chunk_size)
        trained, _ = trainer.logprobs(model, rollout, rows, with_entropy=False)
        mask = rollout.completion_mask[rows].bool()
        gap = max(gap, (sampler.float() - trained.float())[mask].abs().max().item())
    model.train(was_training)
    return gap


class TimedBackend:
    """The rollout backend, timed on its own (tokens/s count generation only); on request, the next rollout's
    log-prob gap is measured right after sampling (its time is left out of the step)."""

    def __init__(self, backend, trainer, device: str, rows_per_pass: int):
        self.backend, self.trainer, self.device, self.rows_per_pass = backend, trainer, device, rows_per_pass
        self.generate_s = self.gap_s = 0.0
        self.tokens, self.gap, self.measure_gap, self.last = 0, None, False, None

    def generate(self, *args, **kwargs):
        sync(self.device)
        t = time.perf_counter()
        rollout = self.backend.generate(*args, **kwargs)
        sync(self.device)
        self.generate_s, self.tokens, self.gap_s, self.last = time.perf_counter() - t, int(rollout.lengths.sum()), 0.0, rollout
        if self.measure_gap:
            t = time.perf_counter()
            self.gap = logprob_gap(self.trainer, rollout, self.rows_per_pass)
            self.measure_gap, self.gap_s = False, time.perf_counter() - t
        return rollout


def sig(x: float) -> float:
    return float(f"{x:.6g}")


def run_part(trainer, rollout: str, args, device: str, limit_s: float, peak_flops: float) -> dict:
    """Warm-up step, then timed steps of one rollout path while the next step fits in `limit_s`."""
    from grpo.rollout import HFGenerateBackend

    cfg, model = trainer.cfg, trainer.engine.module
    hf = HFGenerateBackend(model, trainer.tokenizer, cfg.max_prompt_length, fast_decoding=rollout == "fast")
    if hf.uses_fast_decoding() != (rollout == "fast"):
        return {"status": "skipped", "reason": "the fast decoder does not support this model"}
    timed = trainer.backend = TimedBackend(hf, trainer, device, args.gap_rows)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, steps = time.perf_counter(), []
    for i in range(args.steps + 1):  # step 0 is the warm-up
        spent = time.perf_counter() - start
        if steps and spent + steps[-1]["s"] > limit_s or i == 1 and 2 * spent > limit_s:
            break
        timed.measure_gap = i == 1
        sync(device)
        t = time.perf_counter()
        trainer.train_step()
        sync(device)
        trainer.global_step += 1
        s = time.perf_counter() - t - timed.gap_s
        r = timed.last
        flops = model_flops(model.config, r.prompt_mask.sum(1).tolist(), r.lengths.tolist())
        step_flops = flops["total"] - (0.0 if cfg.beta > 0 else flops["reference"])
        if i:
            steps.append({"s": s, "generate_s": timed.generate_s, "tokens": timed.tokens, "flops": step_flops})
    base = {"warmup_s": round(time.perf_counter() - start - sum(x["s"] for x in steps), 3)}
    if not steps:
        return {**base, "status": "skipped", "steps": 0,
                "reason": f"the warm-up step alone left no time for a timed step within this part's {limit_s:.0f} s"}
    n = len(steps)
    s_per_step = sum(x["s"] for x in steps) / n
    tokens_per_s = sum(x["tokens"] for x in steps) / sum(x["generate_s"] for x in steps)
    flops = sum(x["flops"] for x in steps) / n
    return {**base, "status": "ok" if n == args.steps else "partial", "steps": n,
            **({} if n == args.steps else {"reason": f"{n} of {args.steps} steps fit in {limit_s:.0f} s"}),
            # six significant digits each (not fixed decimals): the derived rates stay consistent with their parts
            "s_per_step": sig(s_per_step), "generate_s_per_step": sig(sum(x["generate_s"] for x in steps) / n),
            "tokens_per_step": sum(x["tokens"] for x in steps) / n, "tokens_per_s": sig(tokens_per_s),
            "flops_per_step": sig(flops), "mfu": sig(flops / s_per_step / peak_flops),
            "peak_mb": round(peak_mb(device), 1), "max_logprob_gap": timed.gap}


def make_trainer(model, tok, rows, args):
    from grpo import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(prompts_per_step=args.prompts, num_generations=args.generations, steps_per_iteration=1000,
                     beta=args.beta, learning_rate=1e-6, max_prompt_length=args.prompt_length,
                     max_completion_length=args.completion_length, precision="bf16",
                     micro_batch_size=args.micro_batch_size, log_every=1000)
    trainer = GRPOTrainer(model, tok, cfg, rows, [("length", length_reward, 1.0)], progress=False)
    if cfg.beta > 0:
        trainer.reference = trainer.engine.make_reference()  # what train() does at an iteration's start
    return trainer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds: checks the script end to end")
    p.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(QWEN25)} (default: both)")
    p.add_argument("--rollouts", default=",".join(ROLLOUTS), help="comma-separated, of fast, hf")
    p.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (default 256; smoke 16)")
    p.add_argument("--completion-length", type=int, default=None, help="max new tokens (default 1024; smoke 16)")
    p.add_argument("--prompts", type=int, default=None, help="B (default 8; smoke 2)")
    p.add_argument("--generations", type=int, default=None, help="G (default 8; smoke 4)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="completions per forward/backward (default 8: B*G = 64 rows of 1280 tokens at once would hold "
                   "~100 GB of activations at 0.5B; smoke: B*G)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per part after one warm-up (default 3; smoke 1)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient; > 0 adds the reference model's forward")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 420; smoke 60)")
    p.add_argument("--gap-rows", type=int, default=16, help="rows per pass of the log-prob gap measurement")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK, help="MFU denominator, FLOP/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "gpu_check.json")
    args = p.parse_args(argv)
    smoke = args.smoke
    for name, full, tiny in (("prompt_length", 256, 16), ("completion_length", 1024, 16), ("prompts", 8, 2),
                             ("generations", 8, 4), ("steps", 3, 1), ("budget", 420.0, 60.0),
                             ("micro_batch_size", 8, None)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    models = ["smoke"] if smoke else (args.models or ",".join(QWEN25)).split(",")
    rollouts = args.rollouts.split(",")
    bad = [m for m in models if m not in QWEN25 and m != "smoke"] + [r for r in rollouts if r not in ROLLOUTS]
    if bad:
        p.error(f"unknown --models/--rollouts value(s) {bad}: models are {list(QWEN25)}, rollouts {list(ROLLOUTS)}")
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU: run on the GPU machine, or use --smoke on a CPU")

    deadline = time.perf_counter() + args.budget
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": smoke,
              "torch": torch.__version__, "precision": "bf16", "peak_flops": args.peak_flops,
              "workload": {k: getattr(args, k) for k in ("prompt_length", "completion_length", "prompts", "generations",
                                                         "steps", "beta", "micro_batch_size", "budget", "seed")},
              "parts": []}
    todo = [(m, r) for m in models for r in rollouts]
    for mi, name in enumerate(models):
        shape = SMOKE_SHAPE if smoke else QWEN25[name]
        eos = shape["vocab_size"] - 1 if smoke else QWEN25_EOS
        left = len(todo) - mi * len(rollouts)
        if time.perf_counter() + 10 > deadline:
            result["parts"] += [{"model": name, "rollout": r, "status": "skipped", "reason": "time budget spent"}
                                for r in rollouts]
            continue
        t = time.perf_counter()
        tok = id_tokenizer(shape["vocab_size"], eos)
        model = build_model(shape, eos, device, args.seed)
        rows = random_prompts(4 * args.prompts, args.prompt_length, shape["vocab_size"], eos, args.seed)
        trainer = make_trainer(model, tok, rows, args)
        build_s = time.perf_counter() - t
        params = sum(p.numel() for p in model.parameters())
        for ri, rollout in enumerate(rollouts):
            limit = (deadline - time.perf_counter()) / (left - ri)
            part = {"model": name, "rollout": rollout, "params": params, "build_s": round(build_s, 2)}
            try:
                part |= run_part(trainer, rollout, args, device, limit, args.peak_flops)
            except torch.OutOfMemoryError as e:
                model.zero_grad(set_to_none=True)  # a half-accumulated gradient must not leak into the next part
                torch.cuda.empty_cache()
                part |= {"status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}"}
            result["parts"].append(part)
            print_part(part)
        del trainer, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return result


def print_part(part: dict) -> None:
    print(f"[gpu_check] {part['model']} {part['rollout']}: {part['status']}"
          + (f" ({part['reason']})" if "reason" in part else ""), file=sys.stderr, flush=True)


def print_table(result: dict) -> None:
    w = result["workload"]
    print(f"\n{result['device']}, bf16, B x G = {w['prompts']} x {w['generations']}, prompt {w['prompt_length']}, "
          f"completion {w['completion_length']}, beta {w['beta']}")
    print(f"{'model':<14} {'rollout':<7} {'steps':>5} {'s/step':>8} {'gen s':>7} {'tok/s':>9} {'MFU':>7} "
          f"{'peak MB':>9} {'max|dlogp|':>10}  status")
    for part in result["parts"]:
        if "s_per_step" not in part:
            print(f"{part['model']:<14} {part['rollout']:<7} {'-':>5} {'':>55}  {part['status']}: {part['reason']}")
            continue
        print(f"{part['model']:<14} {part['rollout']:<7} {part['steps']:>5} {part['s_per_step']:>8.2f} "
              f"{part['generate_s_per_step']:>7.2f} {part['tokens_per_s']:>9.0f} {part['mfu']:>7.2%} "
              f"{part['peak_mb']:>9.0f} {part['max_logprob_gap']:>10.4f}  {part['status']}")


if __name__ == "__main__":
    main()
