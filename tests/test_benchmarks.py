"""Benchmark evaluation (R1's protocol) and evaluation at the papers' settings: the estimators against hand computation,
benchmark files (shapes, column maps, refusals), prompts built as GRPO builds them, top-p reaching the sampler, metrics
in MLflow and in `r1 compare`, and `r1 evaluate --benchmark` on a tiny model."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.compare import bench_scores, compare_rows, print_rows, to_csv
from grpo.rollout import HFGenerateBackend, mix_seed
from rewards import accuracy_reward
from stages.core.benchmarks import (
    FIXTURES,
    BenchmarkError,
    check_benchmarks,
    cli_benchmark,
    cons_at_k,
    evaluate_benchmark,
    load_benchmark,
    pass_at_k,
)
from stages.core.data import prompt_rows, render_chat
from stages.core.evaluate import evaluate
from stages.core.recipe import R1_ZERO_SYSTEM, BenchmarkConfig, EvalConfig, PromptConfig, RecipeError, load_recipe
from stages.core.rejection import Filters, RejectionSampler
from stages.core.tasks import Problem

CHAT = PromptConfig(style="chat")


# ---- the estimators, by hand

def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # k = 1: the plain success rate
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 4, 4) == 1.0  # C(1,2) = 0
    exact = 1 - Fraction(math.comb(1990, 1000), math.comb(2000, 1000))  # binomials of ~600 digits: no float overflow
    assert pass_at_k(2000, 10, 1000) == pytest.approx(float(exact), rel=1e-12)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(*bad)


def test_cons_at_k_is_the_majority_answer():
    # "5" and "5.0" are one answer (two votes) and wrong; the right "6" has one vote; no answer does not vote
    texts = ["<answer>5</answer>", "<answer>5.0</answer>", "<answer>6</answer>", "no answer at all"]
    assert cons_at_k(texts, [False, False, True, False]) == 0.0
    assert cons_at_k(["\\boxed{6}", "<answer>6</answer>", "<answer>5</answer>"], [True, True, False]) == 1.0
    assert cons_at_k(["<answer>6</answer>", "<answer>5</answer>"], [True, False]) == 1.0  # a tie: the first seen
    assert cons_at_k(["nothing", "<answer></answer>"], [False, False]) == 0.0


# ---- benchmark files

def test_fixture_benchmarks_load_in_their_shapes_and_their_answers_verify():
    for name, (path, fmt) in FIXTURES.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert 8 <= len(rows) <= 16
        bench = cli_benchmark(name, None)
        assert (bench.format, bench.name) == (fmt, name)
        problems = load_benchmark(bench)
        assert [p.question for p in problems] == [r["problem"] for r in rows]
        if fmt == "aime":
            assert all(isinstance(r["answer"], int) and 0 <= r["answer"] <= 999 for r in rows)
        else:
            assert all(r["solution"].count("\\boxed{") == 1 and {"subject", "level", "unique_id"} <= set(r) for r in rows)
            assert any("\\frac" in p.answer for p in problems)  # answers math-verify has to check
        answers = [p.answer for p in problems]
        right = [f"<think>so</think><answer>{a}</answer>" for a in answers]
        assert accuracy_reward([""] * len(answers), right, answers) == [1.0] * len(answers)
        if fmt == "math500":  # the reference solution's boxed answer scores as right too, also written as a decimal
            assert accuracy_reward([""] * len(rows), [r["solution"] for r in rows], answers) == [1.0] * len(rows)
            assert accuracy_reward([""], ["<answer>0.375</answer>"], ["\\frac{3}{8}"]) == [1.0]


def test_column_map_and_the_boxed_answer_of_a_solution(tmp_path):
    aime = tmp_path / "aime_2024.jsonl"
    aime.write_text(json.dumps({"ID": "2024-I-1", "Problem": "Find 2+3.", "Answer": 5}) + "\n\n")
    cfg = BenchmarkConfig(name="aime24", path=str(aime), format="aime",
                          columns={"question": "Problem", "answer": "Answer"})
    assert load_benchmark(cfg) == [Problem(question="Find 2+3.", answer="5", task="aime24")]
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    (p,) = load_benchmark(BenchmarkConfig(name="m", path=str(math), format="math500"))
    assert p.answer == "\\frac{1}{2}"
    plain = tmp_path / "qa.jsonl"
    plain.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    (p,) = load_benchmark(BenchmarkConfig(name="qa", path=str(plain), columns={"question": "q", "answer": "a"}))
    assert (p.question, p.answer) == ("1+1?", "2")
    assert cli_benchmark(str(aime), 8) == BenchmarkConfig(name="aime_2024", path=str(aime), format="aime", samples=8)


@pytest.mark.parametrize("lines, fmt, message", [
    (['{"problem": "a", "answer": 1}', '{"problem": "b"}'], "aime", r"bad.jsonl, line 2 has no answer \(column 'answer'\)"),
    (['{"problem": "a", "answer": "1"}', "{oops"], "aime", "bad.jsonl, line 2 is not JSON"),
    (['{"problem": "a", "answer": "12.5"}'], "aime", r"line 1: answer '12.5' is not an integer"),
    (['{"answer": "3"}'], "jsonl", r"line 1 has no question \(column 'question'\)"),
    (['{"problem": "a", "solution": "no box"}'], "math500", r"line 1 has no answer .*boxed"),
    (["", "  "], "jsonl", "bad.jsonl has no rows"),
])
def test_bad_benchmark_rows_are_refused_naming_file_and_line(tmp_path, lines, fmt, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(BenchmarkConfig(name="b", path=str(bad), format=fmt))


def test_missing_benchmark_file_is_refused_before_any_model_loads(tmp_path, mini_recipe):
    from stages.core.preflight import PreflightError, preflight

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(BenchmarkError, match=f"benchmark b: {missing} cannot be read"):
        load_benchmark(BenchmarkConfig(name="b", path=str(missing)))
    recipe = mini_recipe.model_copy(update={"eval": mini_recipe.eval.model_copy(update={"benchmarks": [
        BenchmarkConfig(name="ok", path="aime-fixture", format="aime"), BenchmarkConfig(name="b", path=str(missing))]})})
    expected = f"eval.benchmarks.1: benchmark b: {missing} cannot be read (No such file or directory)"
    assert check_benchmarks(recipe.eval) == [expected]
    with pytest.raises(PreflightError, match=r"eval.benchmarks.1: benchmark b: .*nope.jsonl cannot be read"):
        preflight(recipe, ["r1_zero"], {"model": "/no/such/model"})


def test_benchmark_configs_are_validated_by_the_recipe():
    with pytest.raises(RecipeError, match=r"eval.benchmarks.0.columns: .*unknown column\(s\) \['problem'\]"):
        load_recipe("tiny", {"eval.benchmarks": [{"name": "a", "path": "x", "columns": {"problem": "p"}}]})
    with pytest.raises(RecipeError, match=r"benchmark name\(s\) \['a'\] given twice"):
        load_recipe("tiny", {"eval.benchmarks": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    with pytest.raises(RecipeError, match="eval.benchmarks.0.name"):
        load_recipe("tiny", {"eval.benchmarks": [{"name": "a/b", "path": "x"}]})  # would break bench/<name>/...
    with pytest.raises(RecipeError, match=r"benchmarks.0.pass_k \(8\) is more than the 4 samples drawn per problem"):
        load_recipe("tiny", {"eval.benchmarks": [{"name": "a", "path": "x", "pass_k": 8}]})  # eval.samples_per_prompt 4
    with pytest.raises(RecipeError, match="eval.top_p"):
        load_recipe("tiny", {"eval.top_p": 1.5})
    assert load_recipe("tiny").eval.top_p == 1.0 and load_recipe("tiny").eval.benchmarks == []
    assert load_recipe("qwen2.5-7b").eval.top_p == 0.95 and load_recipe("qwen2.5-1.5b").eval.top_p == 0.95


# ---- what reaches the sampler

class Spy:
    """Stands in for HFGenerateBackend.generate: records prompts and sampling, answers with scripted completions."""

    def __init__(self, script=None):
        self.calls, self.seeds, self.script = [], [], script

    def __call__(self, backend, prompts, k, sampling, seeds=None):
        self.calls.append((list(prompts), k, sampling))
        self.seeds.append(seeds)
        texts = [self.script(p, j) if self.script else "<think>x</think><answer>0</answer>" for p in prompts
                 for j in range(k)]
        return SimpleNamespace(completions=texts, lengths=torch.ones(len(texts), dtype=torch.long),
                               truncated=torch.zeros(len(texts), dtype=torch.bool))


@pytest.fixture
def spy(monkeypatch):
    def install(script=None):
        s = Spy(script)
        monkeypatch.setattr(HFGenerateBackend, "generate", lambda self, p, k, sp, seeds=None: s(self, p, k, sp, seeds))
        return s
    return install


def test_benchmark_metrics_from_scripted_samples(spy, tok, tiny_model):
    """Problem a: right, wrong, right -> 2/3, majority right, pass@3 1, pass@2 1 - C(1,2)/C(3,2) = 1. Problem b: wrong
    twice (the same answer), then right -> 1/3, majority wrong, pass@3 1, pass@2 1 - C(2,2)/C(3,2) = 2/3. So pass@1
    1/2, cons@3 1/2, pass@3 1, pass@2 5/6."""
    problems = [Problem("a", "7", "t"), Problem("b", "8", "t")]
    script = {("a", 0): "7", ("a", 1): "1", ("a", 2): "7", ("b", 0): "2", ("b", 1): "2", ("b", 2): "8"}
    s = spy(lambda prompt, j: f"<answer>{script[(prompt.split(': ')[1].split(chr(10))[0], j)]}</answer>")
    cfg = EvalConfig(temperature=0.6, top_p=0.95, batch_size=3)
    res = evaluate_benchmark(tiny_model(tok), tok, problems, BenchmarkConfig(name="t", path="x", samples=3), cfg,
                             PromptConfig())
    assert (res.pass_at_1, res.cons_at_k, res.pass_at_k) == (pytest.approx(0.5), 0.5, 1.0)
    assert res.metrics() == {"bench/t/pass_at_1": pytest.approx(0.5), "bench/t/cons_at_k": 0.5,
                             "bench/t/pass_at_k": 1.0, "bench/t/samples": 3.0, "bench/t/pass_k": 3.0}
    assert [(len(p), k, sp.temperature, sp.top_p, sp.do_sample) for p, k, sp in s.calls] == [(1, 3, 0.6, 0.95, True)] * 2
    res = evaluate_benchmark(tiny_model(tok), tok, problems, BenchmarkConfig(name="t", path="x", samples=3, pass_k=2),
                             cfg, PromptConfig())
    assert (res.pass_at_1, res.cons_at_k, res.pass_at_k, res.pass_k) == (pytest.approx(0.5), 0.5, pytest.approx(5 / 6), 2)


def test_heldout_evaluation_samples_at_the_recipes_top_p(spy, tok, tiny_model):
    s = spy()
    evaluate(tiny_model(tok), tok, [Problem("1+2", "3", "addition")], EvalConfig(temperature=0.6, top_p=0.95),
             PromptConfig())
    sampled, greedy = (sp for _, _, sp in s.calls)
    assert (sampled.temperature, sampled.top_p, sampled.do_sample) == (0.6, 0.95, True) and not greedy.do_sample
    assert s.seeds == [[mix_seed(1234, 0)], None]  # the sampled completions from the prompt's own seed (eval.seed, 0)


def test_chat_style_evaluation_prompts_are_grpos(spy, tok, tiny_model):
    """Held-out evaluation, benchmarks and rejection sampling all prompt as GRPO trains (grpo_runner: prompt_rows, then
    render_chat): with style chat, the system turn through the chat template; with style template, the template."""
    problems = [Problem("1+2", "3", "addition"), Problem("40+2", "42", "addition")]
    model = tiny_model(tok)
    for prompt in (CHAT, PromptConfig()):
        grpo = [r["prompt"] for r in render_chat(prompt_rows(problems, prompt), tok)]
        s = spy()
        evaluate(model, tok, problems, EvalConfig(samples_per_prompt=1), prompt)
        evaluate_benchmark(model, tok, problems, BenchmarkConfig(name="b", path="x", samples=1), EvalConfig(), prompt)
        RejectionSampler(HFGenerateBackend(model, tok), problems, source_run="m", prompt=prompt, samples_per_prompt=1, temperature=1.0,
                         max_new_tokens=8, filters=Filters(), batch_prompts=2).candidates(0)
        assert [p for p, _, _ in s.calls] == [grpo] * 4  # sampled and greedy held-out, benchmark, rejection
    assert grpo == ["User: 1+2\nAssistant:", "User: 40+2\nAssistant:"]
    chat = [r["prompt"] for r in render_chat(prompt_rows(problems, CHAT), tok)]
    assert chat[0] == f"{R1_ZERO_SYSTEM}\nUser: 1+2\nAssistant:"


# ---- MLflow and r1 compare

def test_stage_evaluation_logs_benchmarks_and_compare_shows_them(spy, tok, tiny_model, mini_recipe, tmp_path):
    import mlflow

    from stages.core import tracking
    from stages.core.context import StageContext, log_evaluation

    spy(lambda prompt, j: "<think>x</think><answer>9</answer>")  # right on the first AIME fixture row only
    recipe = mini_recipe.model_copy(update={"eval": mini_recipe.eval.model_copy(update={"benchmarks": [
        BenchmarkConfig(name="aime-fixture", path="aime-fixture", format="aime", samples=2)]})})
    with mlflow.start_run(experiment_id=tracking.setup(recipe.tracking), tags={"r1.stage": "r1_zero"}) as run:
        log_evaluation(StageContext("r1_zero", recipe, run.info.run_id, "k", tmp_path, {}, False), tiny_model(tok), tok)
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    n = len(load_benchmark(recipe.eval.benchmarks[0]))
    assert {k: v for k, v in metrics.items() if k.startswith("bench/")} == {
        "bench/aime-fixture/pass_at_1": pytest.approx(1 / n), "bench/aime-fixture/cons_at_k": pytest.approx(1 / n),
        "bench/aime-fixture/pass_at_k": pytest.approx(1 / n), "bench/aime-fixture/samples": 2.0,
        "bench/aime-fixture/pass_k": 2.0}
    assert "eval/pass_at_1" in metrics
    inputs = {d.dataset.name: d.dataset.source for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert "aime.jsonl" in inputs["bench-aime-fixture"] and "heldout" in inputs

    (row,) = compare_rows(recipe)
    assert bench_scores(row) == {"aime-fixture": {"n": "2", "pass@1": f"{1 / n:.3f}", "cons@n": f"{1 / n:.3f}",
                                                  "k": "2", "pass@k": f"{1 / n:.3f}"}}
    assert "bench/aime-fixture/cons_at_k" in to_csv([row]).splitlines()[0].split(",")
    from rich.console import Console

    for width in (80, 40):
        out = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        print_rows(out, [row])
        text = out.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        assert "aime-fixture" in text and f"{1 / n:.3f}" in text


# ---- r1 evaluate

def test_r1_evaluate_runs_a_benchmark_and_writes_nothing(mini_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", mini_base, "--benchmark", "aime-fixture", "--benchmark", "math500-fixture", "--samples", "2",
            "--set", "eval.max_new_tokens=8", "--set", "eval.top_p=0.95", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if "-fixture" in line}
    assert set(rows) == {"aime-fixture", "math500-fixture"}
    for line in rows.values():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        assert cells[1:3] == ["12", "2"] and cells[5] == "2"
        assert all(0.0 <= float(cells[i]) <= 1.0 for i in (3, 4, 6))
    assert "held-out" not in res.stdout  # --benchmark: only the benchmarks
    assert list(tmp_path.iterdir()) == []  # printed, not logged: no store, no files


def test_r1_evaluate_refuses_a_bad_benchmark_before_loading_the_model(tmp_path):
    bad = tmp_path / "aime.jsonl"
    bad.write_text('{"problem": "x"}\n')
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "no-model"), "--benchmark", str(bad)])
    assert res.exit_code == 2 and f"benchmark aime: {bad}, line 1 has no answer" in " ".join(res.output.split())
