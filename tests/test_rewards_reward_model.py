"""rewards.reward_model: Bradley-Terry training of a tiny Qwen2 reward model, then scoring through the registry."""

import json
import random
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from grpo.rewards_io import call_reward
from rewards import build_rewards, process_reward_model, reward_model
from rewards.reward_model import VIEW_FILE, RewardModelScorer, pairwise_accuracy, response_text, train_bradley_terry
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
    path = train_bradley_terry(model, tok, train, "full", epochs=2, lr=3e-3, batch_size=16, out_dir=root / "trained")
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


def test_answer_mode_reads_only_the_final_answer(trained, tmp_path):
    path, _, held_out = trained
    assert response_text("<think>secret</think><answer>Hi.</answer>", "answer") == "Hi."
    assert response_text("no think here", "answer") == "no think here"
    unrecorded = shutil.copytree(path, tmp_path / "rm")  # trained elsewhere: the caller names the view
    (unrecorded / VIEW_FILE).unlink()
    scorer = RewardModelScorer(unrecorded, mode="answer")
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


def test_a_reward_model_is_scored_on_the_view_it_was_trained_on(trained):
    """The view (mode) is recorded with the model; the scorer reads it, and asking for another one is refused."""
    path = trained[0]
    assert json.loads((path / VIEW_FILE).read_text()) == {"mode": "full"}
    assert RewardModelScorer(path).mode == "full"  # no mode given: the recorded one, not the default "answer"
    with pytest.raises(ValueError, match="trained on the 'full' view.*'answer' view"):
        RewardModelScorer(path, mode="answer")
    with pytest.raises(ValueError, match="trained on the 'full' view"):
        build_rewards([{"name": "reward_model", "params": {"path": str(path), "mode": "answer"}}])


def test_training_reads_each_completion_through_the_view(tok, tiny_model, tmp_path, monkeypatch):
    """What the model learns from is what it will score: prompt + response_text(completion, mode), both sides."""
    seen = []
    real = reward_model._scores

    def spy(model, tokenizer, texts, max_length, device):
        seen.extend(texts)
        return real(model, tokenizer, texts, max_length, device)

    monkeypatch.setattr(reward_model, "_scores", spy)
    pairs = [("Q:", "<think>go away</think><answer>Hi.</answer>", "<think>kind</think><answer>No.</answer>"),
             ("Q:", " plain", " bad")]
    model = tiny_model(tok, arch="qwen2_classifier", num_labels=1)
    path = train_bradley_terry(model, tok, pairs, "answer", batch_size=2, out_dir=tmp_path / "rm")
    assert seen == ["Q:Hi.", "Q:plain", "Q:No.", "Q:bad"] or seen == ["Q:plain", "Q:Hi.", "Q:bad", "Q:No."]
    seen.clear()
    RewardModelScorer(path)(["Q:"] * 2, [pairs[0][1], pairs[1][1]])
    assert sorted(seen) == ["Q:Hi.", "Q:plain"]


def test_bad_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'middle'"):
        RewardModelScorer(tmp_path, mode="middle")
    with pytest.raises(ValueError, match="at least one"):
        train_bradley_terry(str(tmp_path), None, [], "full", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown mode 'middle'"):
        train_bradley_terry(str(tmp_path), None, [("p", "c", "r")], "middle", out_dir=tmp_path / "x")
    (tmp_path / VIEW_FILE).write_text(json.dumps({"mode": "reasoning"}))
    with pytest.raises(ValueError, match=f"{VIEW_FILE}: unknown mode 'reasoning'"):
        RewardModelScorer(tmp_path)
