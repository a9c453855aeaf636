"""Benchmark evaluation the way DeepSeek-R1 reports it: n samples per problem at the evaluation temperature and top-p,
then pass@1 averaged over the n samples, cons@n (the majority answer of the n; R1's cons@64), and pass@k for a k <= n
(Chen et al. 2021's unbiased estimator from all n samples; k = n by default).

Sets are local JSON-lines files in the shapes real benchmarks come in: `aime` (problem, integer answer), `math500`
(problem, solution ending in `\\boxed{}`, answer) or `jsonl` (question, answer); `columns` maps other names. Answers are
checked by the accuracy reward (numbers exactly, LaTeX through math-verify). `stages/fixtures` ships made-up sets in
both shapes, named `aime-fixture` and `math500-fixture`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rewards import accuracy_reward, extract_answer, extract_boxed, normalize_answer
from rewards.accuracy import as_number
from stages import fixtures
from stages.core.config_base import expand_path
from stages.core.evaluate import sample_on_all_ranks
from stages.core.heldout import problem_prompts
from stages.core.recipe import BenchmarkConfig, EvalConfig, PromptConfig, cut
from stages.core.tasks import Problem

FIXTURES = {"aime-fixture": (fixtures.AIME, "aime"), "math500-fixture": (fixtures.MATH500, "math500")}
COLUMNS = {"aime": {"question": "problem", "answer": "answer"},
           "math500": {"question": "problem", "answer": "answer", "solution": "solution"},
           "jsonl": {"question": "question", "answer": "answer"}}
MAX_BENCHMARK_BYTES = 100_000_000  # MATH-500 is under 1 MB; AIME a few kB


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read, or a row that cannot be scored; the message names the file and line."""


# ---- the metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c of them correct) is correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), as a product of ratios so large n never builds huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def vote_key(completion: str) -> str | None:
    """What counts as the same answer in a vote: the normalised final answer (numbers by value), None when there is none."""
    answer = extract_answer(completion)
    if answer is None or not answer.strip():
        return None
    text = normalize_answer(answer)
    number = as_number(text)
    return text if number is None else f"{number.normalize():f}"


def cons_at_k(completions: list[str], correct: list[bool]) -> float:
    """1.0 when the majority answer of the k completions is correct (ties: the answer seen first; completions with no
    answer do not vote)."""
    keys = [vote_key(c) for c in completions]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    winner = votes.most_common(1)[0][0]
    return float(correct[keys.index(winner)])


# ---- the files

def benchmark_file(path: str) -> Path:
    """A benchmark's file: the path, or a shipped fixture's by name."""
    file = expand_path(path)
    if not file.exists() and path in FIXTURES:
        return FIXTURES[path][0]
    return file


def cli_benchmark(name_or_path: str, samples: int | None) -> BenchmarkConfig:
    """The config `r1 evaluate --benchmark` builds: a fixture by name, or a file (format aime/math500 from its name,
    else jsonl)."""
    if name_or_path in FIXTURES and not expand_path(name_or_path).exists():
        return BenchmarkConfig(name=name_or_path, path=name_or_path, format=FIXTURES[name_or_path][1], samples=samples)
    stem = Path(name_or_path).stem
    fmt = "aime" if "aime" in stem.lower() else "math500" if "math" in stem.lower() else "jsonl"
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem)[:64] or "benchmark"
    return BenchmarkConfig(name=name, path=name_or_path, format=fmt, samples=samples)


def load_benchmark(cfg: BenchmarkConfig) -> list[Problem]:
    """The problems of a benchmark file; BenchmarkError naming the file (and line) for a file that is missing,
    unreadable, not JSON lines, empty, or a row without a question or an answer."""
    file = benchmark_file(cfg.path)
    where = f"benchmark {cfg.name}: {file}"
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_BENCHMARK_BYTES + 1)
    except OSError as e:
        raise BenchmarkError(f"{where} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_BENCHMARK_BYTES:
        raise BenchmarkError(f"{where} is larger than {MAX_BENCHMARK_BYTES:,} bytes")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{where} is not UTF-8 text (byte {e.start})") from None
    names = COLUMNS[cfg.format] | cfg.columns
    problems = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            problems.append(_problem(line, names, cfg, f"{where}, line {n}"))
    if not problems:
        raise BenchmarkError(f"{where} has no rows (expected JSON lines with {names['question']!r} and "
                             f"{names['answer']!r})")
    return problems


def _problem(line: str, names: dict[str, str], cfg: BenchmarkConfig, where: str) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{where} is not JSON ({e.msg}): {cut(line, 80)}") from None
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where} is not a JSON object")
    question = row.get(names["question"])
    if not isinstance(question, str) or not question.strip():
        raise BenchmarkError(f"{where} has no question (column {names['question']!r}); it has {sorted(row)}")
    answer = row.get(names["answer"])
    if answer is None and cfg.format == "math500" and isinstance(row.get(names["solution"]), str):
        answer = extract_boxed(row[names["solution"]])  # MATH: the solution's last \boxed{}
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        column = names["answer"] + (f" or a \\boxed{{}} in {names['solution']!r}" if cfg.format == "math500" else "")
        raise BenchmarkError(f"{where} has no answer (column {column!r}); it has {sorted(row)}")
    if cfg.format == "aime" and not answer.strip().isdigit():
        raise BenchmarkError(f"{where}: answer {cut(repr(answer), 40)} is not an integer (AIME answers are 0-999)")
    return Problem(question=question, answer=answer.strip(), task=cfg.name)


# ---- the evaluation

@dataclass
class BenchmarkResult:
    name: str
    pass_at_1: float  # sampled accuracy averaged over the n samples of every problem
    cons_at_k: float  # majority vote of the n samples
    pass_at_k: float  # unbiased estimator at k = pass_k
    num_problems: int
    samples: int  # n
    pass_k: int  # k

    def metrics(self, prefix: str = "bench/") -> dict[str, float]:
        """bench/<name>/pass_at_1 ... (MLflow refuses `@` in a metric name)."""
        base = f"{prefix}{self.name}/"
        return {base + "pass_at_1": self.pass_at_1, base + "cons_at_k": self.cons_at_k,
                base + "pass_at_k": self.pass_at_k, base + "samples": float(self.samples),
                base + "pass_k": float(self.pass_k)}


def evaluate_benchmark(model, tokenizer, problems: list[Problem], bench: BenchmarkConfig, cfg: EvalConfig,
                       prompt: PromptConfig, progress: bool = False) -> BenchmarkResult | None:
    """n samples per problem at cfg's temperature and top-p, prompts built as in training; the three metrics on rank 0
    (None on the other ranks of a launch: every rank generates its share, stages.core.evaluate.sample_on_all_ranks)."""
    from grpo.rollout import HFGenerateBackend, SamplingParams  # lazy: imports torch

    n = bench.samples or cfg.samples_per_prompt
    k = bench.pass_k or n
    prompts = problem_prompts(problems, prompt, tokenizer)
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    per_problem = sample_on_all_ranks(HFGenerateBackend(model, tokenizer), prompts, n, sampling, cfg.seed,
                                      cfg.batch_size, f"benchmark {bench.name}", progress)
    if per_problem is None:
        return None
    texts = [t for ts, _, _ in per_problem for t in ts]
    answers = [p.answer for p in problems for _ in range(n)]
    correct = [a >= 1.0 for a in accuracy_reward([q for q in prompts for _ in range(n)], texts, answers)]
    groups = [(texts[i * n : (i + 1) * n], correct[i * n : (i + 1) * n]) for i in range(len(problems))]
    return BenchmarkResult(
        name=bench.name,
        pass_at_1=sum(correct) / len(correct),
        cons_at_k=sum(cons_at_k(t, c) for t, c in groups) / len(groups),
        pass_at_k=sum(pass_at_k(n, sum(c), k) for _, c in groups) / len(groups),
        num_problems=len(problems),
        samples=n,
        pass_k=k,
    )


def check_benchmarks(cfg: EvalConfig) -> list[str]:
    """Preflight: every benchmark of the recipe loads (file, rows, answers); one line per problem."""
    problems = []
    for i, bench in enumerate(cfg.benchmarks):
        try:
            load_benchmark(bench)
        except BenchmarkError as e:
            problems.append(f"eval.benchmarks.{i}: {e}")
    return problems
