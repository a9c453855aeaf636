"""Procedurally generated reasoning problems, with R1-formatted traces.

No hub is reachable, so the `tiny` preset's data comes from here: arithmetic problems whose step-by-step traces are
written the way the R1 template wants (`<think>steps</think><answer>result</answer>`), plus reasoning-gym families for
anything richer. Each problem row carries what a scorer needs (`answer`, and `task`/`metadata` for reasoning-gym).

`noisy_trace` makes deliberately imperfect traces for pretraining the tiny base model, so that the base model shows the
flaws R1-Zero had to fix: wrong answers, broken format, and language mixing (Chinese words inside English steps).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

# Words of a trace that the language-mixing noise swaps for Chinese ones.
ZH_WORDS = {"write": "写", "carry": "进位", "so": "所以", "add": "加", "the": "这个", "answer": "答案", "is": "是"}


@dataclass
class Problem:
    question: str
    answer: str
    task: str
    steps: list[str] = field(default_factory=list)
    metadata: str = "{}"  # JSON; what reasoning-gym's scorer needs for its families

    def row(self, prompt_id: str) -> dict:
        d = asdict(self)
        d["prompt_id"] = prompt_id
        return d


def addition(rng: random.Random, max_digits: int = 2) -> Problem:
    """a + b with a column-by-column trace: one step per column, carries spelled out."""
    a = rng.randint(0, 10**max_digits - 1)
    b = rng.randint(0, 10**max_digits - 1)
    steps = _addition_steps(a, b)
    return Problem(question=f"{a}+{b}", answer=str(a + b), task="addition", steps=steps)


def _addition_steps(a: int, b: int) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lhs = f"{x}+{y}" + (f"+{carry}" if carry else "")
        new_carry = s // 10
        steps.append(f"{lhs}={s}, write {s % 10}" + (f" carry {new_carry}" if new_carry else "") + ".")
        carry = new_carry
    if carry:
        steps.append(f"write {carry}.")
    return steps


NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "milk", "road", "star", "fish", "book", "lamp"]


def general(rng: random.Random, **_) -> Problem:
    """A non-reasoning instruction with one good reply (stand-in for R1's general data, written by DeepSeek-V3 there).

    The reply is plain text, no CoT: general samples teach the model to answer simple requests directly.
    """
    kind = rng.choice(["greet", "repeat", "upper", "count"])
    if kind == "greet":
        name = rng.choice(NAMES)
        return Problem(f"Greet {name}.", f"Hello, {name}! Nice to meet you.", "general:greet")
    words = rng.sample(WORDS, rng.randint(2, 3))
    if kind == "repeat":
        return Problem(f"Repeat: {' '.join(words)}", " ".join(words), "general:repeat")
    if kind == "upper":
        return Problem(f"Uppercase: {' '.join(words)}", " ".join(words).upper(), "general:upper")
    return Problem(f"Count the words: {' '.join(words)}", f"There are {len(words)} words.", "general:count")


def bad_reply(p: Problem, rng: random.Random, harmful: bool = False) -> str:
    """A worse reply to a general problem: unhelpful (wrong or evasive) or, with `harmful`, rude."""
    if harmful:
        return rng.choice(["Go away, I will not help you.", "That is a stupid request.", "Figure it out yourself."])
    return rng.choice([p.answer[::-1], "I do not know.", p.question, " ".join(p.answer.split()[:1])])


def reasoning_gym_problems(name: str, size: int, seed: int) -> list[Problem]:
    """Problems from a reasoning-gym family; its entry's metadata travels with the row so its own scorer can check."""
    import reasoning_gym

    data = reasoning_gym.create_dataset(name, size=size, seed=seed)
    out = []
    for entry in data:
        out.append(
            Problem(
                question=entry["question"],
                answer=str(entry["answer"]),
                task=f"rg:{name}",
                metadata=json.dumps(entry.get("metadata", {}), default=str),
            )
        )
    return out


GENERATORS = {"addition": addition, "general": general}


def make_problems(task: str, n: int, seed: int, **params) -> list[Problem]:
    """n problems of one family, deterministic for the seed."""
    if task.startswith("rg:"):
        return reasoning_gym_problems(task[3:], n, seed)
    if task not in GENERATORS:
        raise ValueError(f"unknown task family {task!r}; known: {sorted(GENERATORS)} or 'rg:<reasoning-gym name>'")
    rng = random.Random(seed)
    return [GENERATORS[task](rng, **params) for _ in range(n)]


def clean_trace(p: Problem) -> str:
    """The completion a perfect model would write."""
    return f"<think>{' '.join(p.steps)} so the answer is {p.answer}.</think><answer>{p.answer}</answer>"


@dataclass
class TraceNoise:
    """How often each flaw appears in the tiny base model's pretraining traces."""

    wrong_answer: float = 0.25  # an arithmetic slip in a step, carried to the answer
    no_tags: float = 0.15  # the trace without <think>/<answer> tags
    mixed_language: float = 0.2  # some words of the steps written in Chinese


def noisy_trace(p: Problem, rng: random.Random, noise: TraceNoise) -> str:
    steps = list(p.steps)
    answer = p.answer
    if rng.random() < noise.wrong_answer and steps:
        delta = rng.choice([-2, -1, 1, 2, 10, -10])
        wrong = int(answer) + delta if answer.lstrip("-").isdigit() else answer
        answer = str(max(0, wrong))
    if rng.random() < noise.mixed_language:
        steps = [_mix_language(s, rng) for s in steps]
        reason = " ".join(steps) + f" {ZH_WORDS['so']} {ZH_WORDS['answer']} {ZH_WORDS['is']} {answer}."
    else:
        reason = " ".join(steps) + f" so the answer is {answer}."
    if rng.random() < noise.no_tags:
        return rng.choice([f"{reason} {answer}", f"{reason} answer: {answer}", f"<think>{reason} {answer}"])
    return f"<think>{reason}</think><answer>{answer}</answer>"


def _mix_language(step: str, rng: random.Random) -> str:
    words = step.split(" ")
    return " ".join(ZH_WORDS.get(w, w) if rng.random() < 0.7 else w for w in words)
