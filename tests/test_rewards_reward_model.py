"""rewards.reward_model: Bradley-Terry training of a tiny Qwen2 reward model, then scoring through the registry."""

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from grpo.rewards_io import call_reward
from rewards import build_rewards, process_reward_model
from rewards.reward_model import RewardModelScorer, pairwise_accuracy, response_text, train_bradley_terry
from stages.core.tokenizer import train_tokenizer

TOPICS = [
    "the weather",
    "my homework",
    "a recipe",
    "the train times",
    "a good book",
    "this error",
    "the score",
    "my garden",
    "the meeting",
    "a gift idea",
    "the museum",
    "my bike",
]
POLITE = [
    "Thank you for asking, I am happy to help with",
    "Of course, here is a kind answer about",
    "Great question, glad to explain",
    "Sure, with pleasure, let me help with",
]
RUDE = ["Go away, I will not talk about", "Stupid question, figure out", "Shut up about", "Nobody cares about"]


def pair(rng, topic):
    prompt = f"User: Can you help me with {topic}?\nAssistant:"
    think = f" <think>they ask about {topic}.</think>"
    chosen = f"{think}<answer>{rng.choice(POLITE)} {topic}.</answer>"
    rejected = f"{think}<answer>{rng.choice(RUDE)} {topic}.</answer>"
    return prompt, chosen, rejected


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    rng = random.Random(0)
    train = [pair(rng, t) for t in TOPICS[:8] for _ in range(12)]
    held_out = [pair(rng, t) for t in TOPICS[8:] for _ in range(6)]  # topics never seen in training
    tok = train_tokenizer([p + c + r for p, c, r in train + held_out], vocab_size=400)
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id, arch="qwen2_classifier", num_labels=1,
                       num_hidden_layers=2, tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("rm")
    model.save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    before = pairwise_accuracy(RewardModelScorer(root / "init", mode="full"), held_out)
    path = train_bradley_terry(model, tok, train, epochs=2, lr=3e-3, batch_size=16, out_dir=root / "trained")
    return Path(path), before, held_out


def test_bradley_terry_beats_chance_on_held_out_pairs(trained):
    path, before, held_out = trained
    assert (path / "model.safetensors").exists()
    after = pairwise_accuracy(RewardModelScorer(path, mode="full", batch_size=5), held_out)
    assert after >= 0.9 and after > before, (before, after)


def test_scores_do_not_depend_on_batching_or_padding(trained):
    path, _, held_out = trained
    texts = [p + c for p, c, _ in held_out[:4]] + ["User: hi\nAssistant: ok"]
    batched = RewardModelScorer(path, mode="full", batch_size=8).score(texts)
    alone = RewardModelScorer(path, mode="full", batch_size=1).score(texts)
    assert batched == pytest.approx(alone, abs=1e-4)


def test_answer_mode_reads_only_the_final_answer(trained):
    path, _, held_out = trained
    assert response_text("<think>secret</think><answer>Hi.</answer>", "answer") == "Hi."
    assert response_text("no think here", "answer") == "no think here"
    scorer = RewardModelScorer(path, mode="answer")
    a = "<think>rude words: go away, stupid</think><answer>Thank you for asking, I am happy to help with it.</answer>"
    b = "<think>kind words</think><answer>Thank you for asking, I am happy to help with it.</answer>"
    sa, sb = scorer(["User: hi\nAssistant:"] * 2, [a, b])
    assert sa == pytest.approx(sb, abs=1e-5)
    p, c, r = held_out[0]
    good, bad = scorer([p, p], [c, r])
    assert good > bad


def test_through_the_registry_and_as_process_reward(trained):
    path, _, held_out = trained
    [(name, fn, _w)] = build_rewards(
        [{"name": "reward_model", "weight": 0.5, "params": {"path": str(path), "mode": "full", "batch_size": 4}}]
    )
    prompts = [p for p, _, _ in held_out[:3]] * 2
    comps = [c for _, c, _ in held_out[:3]] + [r for _, _, r in held_out[:3]]
    scores = call_reward(name, fn, prompts, comps, answer=[""] * 6, prompt_id=list("abcabc"))
    assert all(g > b for g, b in zip(scores[:3], scores[3:]))
    prm = process_reward_model(RewardModelScorer(path, mode="full"))
    out = call_reward("prm", prm, prompts[:1], comps[:1])
    assert out[0][-1][0] == len(comps[0]) and len(out[0]) == 2  # the think step, then the answer step


def test_bad_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'middle'"):
        RewardModelScorer(tmp_path, mode="middle")
    with pytest.raises(ValueError, match="at least one"):
        train_bradley_terry(str(tmp_path), None, [], out_dir=tmp_path / "x")
