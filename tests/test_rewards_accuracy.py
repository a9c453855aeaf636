"""rewards.accuracy: fast numeric path, normalised match, math-verify (in workers, with a deadline), reasoning-gym."""

import logging
import threading
import time

import pytest

import rewards.accuracy as acc
from rewards.accuracy import accuracy_reward, as_number, normalize_answer
from stages.core.tasks import clean_trace, make_problems


def R(ans: str) -> str:
    return f"<think>so the answer is {ans}.</think><answer>{ans}</answer>"


@pytest.fixture
def no_math_verify(monkeypatch):
    """Fail the test if anything reaches math-verify."""

    def boom(*a, **k):
        raise AssertionError("math-verify was called")

    monkeypatch.setattr(acc, "shared_verifier", boom)


def test_fast_path_numbers(no_math_verify):
    comps = [R("85"), R("85.0"), R("84"), R("+85"), R("1,024"), R("$85$"), R("\\boxed{85}"), R("85."), R("0.50")]
    gold = ["85", "85", "85", "85", "1024", "85", "85", "85", ".5"]
    assert accuracy_reward([""] * 9, comps, gold) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_addition_traces_from_tasks(no_math_verify):
    probs = make_problems("addition", 20, seed=3)
    comps = [clean_trace(p) for p in probs]
    wrong = [
        c.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>") for c, p in zip(comps, probs)
    ]
    gold = [p.answer for p in probs]
    assert accuracy_reward([""] * 20, comps, gold, task=["addition"] * 20, metadata=["{}"] * 20) == [1.0] * 20
    assert accuracy_reward([""] * 20, wrong, gold) == [0.0] * 20


def test_hostile_completions_score_zero(no_math_verify):
    comps = [
        "<think>a</think><answer>84</answer><answer>85</answer>",  # hedging with two answers
        "<think>so the answer is 85.</think> 85",  # answer outside the tags
        "<think></think><answer></answer>",
        "<think>a</think><answer><answer>85</answer></answer>",
        "<think>a</think><answer>85",  # unclosed
        "<think>" + "8" * 1_000_000 + "</think><answer>" + "9" * 10_000 + "</answer>",  # huge number: not "plain"
    ]
    t = time.process_time()
    out = accuracy_reward([""] * len(comps), comps, ["85"] * 5 + ["1"], math_verify=False)
    assert out == [0.0] * len(comps)
    assert time.process_time() - t < 1.0


def test_huge_answer_is_not_sent_to_math_verify(no_math_verify):
    t = time.process_time()
    out = accuracy_reward([""], ["<think>x</think><answer>" + "x^{2}+" * 200_000 + "1</answer>"], ["1"])
    assert out == [0.0] and time.process_time() - t < 1.0


def test_normalisation():
    assert normalize_answer("  $\\boxed{ \\text{Yes} }$. ") == "yes"
    assert normalize_answer("A  B") == "a b"
    assert as_number("1,024") == 1024 and as_number("-3.50") == as_number("-3.5")
    assert as_number("1,02") is None and as_number("1e5") is None and as_number("x") is None


def test_string_answers_match_exactly_after_normalisation(no_math_verify):
    assert accuracy_reward(["", ""], [R("Paris"), R("PARIS.")], ["paris", "Paris"]) == [1.0, 1.0]


def test_reasoning_gym_scorer():
    rows = make_problems("rg:fraction_simplification", 2, seed=1) + make_problems("rg:word_sorting", 1, seed=0)
    gold = [p.answer for p in rows]
    task = [p.task for p in rows]
    meta = [p.metadata for p in rows]
    assert accuracy_reward([""] * 3, [R(a) for a in gold], gold, task=task, metadata=meta) == [1.0, 1.0, 1.0]
    # the default scorer gives partial credit (len(gold)/len(pred)) for a prediction containing the answer: not 1.0
    wrong = [R("7/9"), R(gold[1] + " or maybe 1/2"), R(gold[2].replace(",", ""))]
    assert accuracy_reward([""] * 3, wrong, gold, task=task, metadata=meta) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not registered"):
        accuracy_reward([""], [R("1")], ["1"], task=["rg:no_such_family"], metadata=["{}"])


def test_math_verify_latex():
    comps = [R("\\frac{2}{4}"), R("0.5"), R("\\boxed{\\frac{1}{2}}"), R("\\frac{1}{3}"), R("x^2+1"), R("1+x^2")]
    gold = ["\\frac{1}{2}", "\\frac{1}{2}", "0.5", "\\frac{1}{2}", "x^2+1", "$x^2+1$"]
    assert accuracy_reward([""] * 6, comps, gold) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_math_verify_from_a_thread():
    # math-verify's own signal.alarm timeout fails outside the main thread; the worker processes do not care
    out = {}
    t = threading.Thread(
        target=lambda: out.setdefault("r", accuracy_reward([""], [R("\\frac{2}{4}")], ["\\frac{1}{2}"]))
    )
    t.start()
    t.join(60)
    assert out["r"] == [1.0]


def test_math_verify_hang_times_out_and_logs(caplog):
    accuracy_reward([""], [R("\\frac{2}{4}")], ["\\frac{1}{2}"], math_verify_timeout=1.0)  # start the worker
    tower = "\\boxed{9^{9^{9^{9^{9}}}}}"  # sympy tries to evaluate the power tower
    t = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        out = accuracy_reward(["", ""], [R(tower), R("\\frac{3}{6}")], ["1", "\\frac{1}{2}"], math_verify_timeout=1.0)
    elapsed = time.perf_counter() - t
    assert out == [0.0, 1.0]  # the pair after the hang is still verified (by a fresh worker)
    assert elapsed < 8.0, elapsed  # 1 s deadline + one worker restart on a loaded 2-core machine
    assert any("9^{9^{9" in r.getMessage() and "scored 0" in r.getMessage() for r in caplog.records)


def test_verifier_survives_a_dead_worker():
    from rewards.math_verifier import MathVerifier, shared_verifier

    v = shared_verifier(1, 1.0)  # the hang test's verifier: one worker start saved
    assert v.verify_many([("\\frac{4}{8}", "\\frac{1}{2}")]) == [True]
    v._workers[0].proc.kill()
    v._workers[0].proc.wait()
    assert v.verify_many([("\\frac{5}{10}", "\\frac{1}{2}"), ("\\frac{1}{3}", "\\frac{1}{2}")]) == [True, False]
    with pytest.raises(ValueError, match="workers"):
        MathVerifier(workers=0)
