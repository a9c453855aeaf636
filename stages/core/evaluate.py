"""Held-out evaluation, run at the end of every stage on prompts never used in training.

Metrics (all in [0, 1]):
- pass@1: sampled accuracy averaged over k samples per prompt (temperature and top-p from the recipe);
- greedy_accuracy: one greedy completion per prompt;
- format_rate: share of sampled completions in the strict R1 template;
- language_consistency: mean share of target-language words in the CoT; language_clean_rate: share fully consistent.

Prompts are built the way GRPO builds them (stages.core.heldout.problem_prompts), so a model trained on chat-template
prompts is evaluated on chat-template prompts. Benchmark sets: stages.core.benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rewards import accuracy_reward, format_reward, language_consistency_reward
from stages.core import console
from stages.core.heldout import problem_prompts
from stages.core.recipe import EvalConfig, PromptConfig
from stages.core.tasks import Problem


@dataclass
class EvalResult:
    pass_at_1: float
    greedy_accuracy: float
    format_rate: float
    language_consistency: float
    language_clean_rate: float
    mean_completion_tokens: float
    num_prompts: int
    samples_per_prompt: int
    samples: list[dict] = field(default_factory=list, repr=False)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        d = asdict(self)
        d.pop("samples")
        return {f"{prefix}{k}": float(v) for k, v in d.items()}


def evaluate(model, tokenizer, problems: list[Problem], cfg: EvalConfig, prompt: PromptConfig,
             progress: bool = False) -> EvalResult:
    import torch

    from grpo.rollout import HFGenerateBackend, SamplingParams  # lazy: imports torch

    if not problems:
        raise ValueError("evaluation needs at least one held-out problem")
    backend = HFGenerateBackend(model, tokenizer)
    prompts = problem_prompts(problems, prompt, tokenizer)
    k = cfg.samples_per_prompt
    sampled = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             do_sample=True)
    greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=False)
    per_batch = max(1, cfg.batch_size // k)

    torch.manual_seed(cfg.seed)
    texts, lengths, greedy_texts = [], [], []
    with torch.no_grad():
        for i in console.progress_iter(range(0, len(prompts), per_batch), "evaluate", progress):
            r = backend.generate(prompts[i : i + per_batch], k, sampled)
            texts.extend(r.completions)
            lengths.extend(r.lengths.tolist())
            greedy_texts.extend(backend.generate(prompts[i : i + per_batch], 1, greedy).completions)

    rep = [p for p in problems for _ in range(k)]
    cols = {"answer": [p.answer for p in rep], "task": [p.task for p in rep], "metadata": [p.metadata for p in rep]}
    rep_prompts = [q for q in prompts for _ in range(k)]
    acc = accuracy_reward(rep_prompts, texts, **cols)
    fmt = format_reward(rep_prompts, texts, **cols)
    lang = language_consistency_reward(rep_prompts, texts, target_language=prompt.target_language, **cols)
    g_acc = accuracy_reward(prompts, greedy_texts, answer=[p.answer for p in problems],
                            task=[p.task for p in problems], metadata=[p.metadata for p in problems])
    n = len(texts)
    samples = [
        {"prompt": rep_prompts[j], "completion": texts[j], "answer": cols["answer"][j], "accuracy": acc[j],
         "format": fmt[j], "language": lang[j]}
        for j in range(n)
    ]
    return EvalResult(
        pass_at_1=sum(acc) / n,
        greedy_accuracy=sum(g_acc) / len(g_acc),
        format_rate=sum(fmt) / n,
        language_consistency=sum(lang) / n,
        language_clean_rate=sum(1.0 for v in lang if v >= 1.0) / n,
        mean_completion_tokens=sum(lengths) / n,
        num_prompts=len(problems),
        samples_per_prompt=k,
        samples=samples,
    )

