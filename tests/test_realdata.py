"""Real-format data and models: chat templates, conversational rows, local formats, the shipped fixture sets, any
one-label reward model. Everything local: the hub is only reached for its offline message."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from stages.core.configs import DataSource
from stages.core.data import (
    DataInputError,
    load_cot_dataset,
    load_preference_pairs,
    load_problems,
    prompt_rows,
    render_chat,
    split_of,
)
from stages.core.recipe import R1_ZERO_SYSTEM, PromptConfig
from stages.core.tasks import Problem
from stages.fixtures import CHAT_SFT, MATH_RL, PREFERENCES

CHAT = PromptConfig(style="chat")
MATH = DataSource(source="path", path=str(MATH_RL), columns={"question": "problem"}, num_prompts=100)


def test_r1_zero_system_text_is_the_papers():
    assert R1_ZERO_SYSTEM.startswith("A conversation between User and Assistant. The user asks a question, and the ")
    assert R1_ZERO_SYSTEM.endswith("i.e., <think> reasoning process here </think> <answer> answer here </answer>.")
    assert PromptConfig().style == "template" and PromptConfig().system == R1_ZERO_SYSTEM


def test_chat_rows_go_through_the_chat_template(tok):
    probs = [Problem("1+2", "3", "addition")]
    (plain,) = prompt_rows(probs, PromptConfig())
    assert plain["prompt"] == "User: 1+2\nAssistant:" and "messages" not in plain  # style template: as before
    (row,) = render_chat(prompt_rows(probs, CHAT), tok)
    assert row["prompt"] == f"{R1_ZERO_SYSTEM}\nUser: 1+2\nAssistant:" and "messages" not in row
    (bare,) = render_chat(prompt_rows(probs, PromptConfig(style="chat", system=None)), tok)
    assert bare["prompt"] == "User: 1+2\nAssistant:"
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(DataInputError, match="prompt.style is chat, but the tokenizer of .* has no chat template"):
        render_chat(prompt_rows(probs, CHAT), no_template)


def test_conversational_rows_need_style_chat(tmp_path):
    path = tmp_path / "conv.jsonl"
    conv = [{"role": "user", "content": "What is 4+5?"}, {"role": "assistant", "content": "9"}]
    path.write_text(json.dumps({"prompt": conv, "answer": "9"}) + "\n")
    src = DataSource(source="path", path=str(path))
    (p,) = load_problems(src, split_of("What is 4+5?"))
    assert p.question == "What is 4+5?" and p.messages == conv[:1]  # the reference reply is not part of the prompt
    with pytest.raises(DataInputError, match="is a conversation .* set prompt.style: chat"):
        prompt_rows([p], PromptConfig())
    assert prompt_rows([p], CHAT)[0]["messages"] == [{"role": "system", "content": R1_ZERO_SYSTEM}, conv[0]]


ROWS = [{"q": f"{a}+{a + 1}", "a": str(2 * a + 1)} for a in range(40)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_every_local_format_loads_the_same_problems(tmp_path, fmt):
    import datasets

    path = tmp_path / f"set.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    else:
        ds = datasets.Dataset.from_list(ROWS)
        {"csv": ds.to_csv, "parquet": ds.to_parquet, "disk": ds.save_to_disk}[fmt](str(path))
    src = DataSource(source="path", path=str(path), columns={"question": "q", "answer": "a"}, num_prompts=100)
    got = [(p.question, p.answer) for p in load_problems(src, "train")]
    assert got == [(r["q"], r["a"]) for r in ROWS if split_of(r["q"]) == "train"] and len(got) > 30


def test_hub_data_set_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = DataSource(source="hub", path="no-such-org/no-such-set")
    with pytest.raises(DataInputError, match="'no-such-org/no-such-set' is not in the local cache and HF_HUB_OFFLINE "
                                             "is set: download it first with `huggingface-cli download"):
        load_problems(src, "train")


def test_math_fixture_trains_a_chat_grpo_step(tok, tiny_model):
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from rewards import build_rewards

    problems = load_problems(MATH, "train")
    assert len(problems) == 19 and all(p.answer.isdigit() for p in problems)  # 20 rows, one held out
    rows = render_chat(prompt_rows(problems, CHAT), tok)
    assert rows[0]["prompt"] == f"{R1_ZERO_SYSTEM}\nUser: {problems[0].question}\nAssistant:"
    cfg = GRPOConfig(prompts_per_step=2, num_generations=2, steps_per_iteration=1, beta=0.0, learning_rate=1e-3,
                     max_completion_length=4, max_prompt_length=512, seed=0)
    model = tiny_model(tok, max_position_embeddings=640)
    history = GRPOTrainer(model, tok, cfg, rows, build_rewards([{"name": "format"}]), progress=False).train()
    assert len(history) == 1 and "reward/mean" in history[0]


def test_chat_sft_fixture_trains_with_the_system_turn(tok, tiny_model):
    from stages.core.sft import SFTConfig, SFTTrainer, tokenize_examples

    examples = load_cot_dataset(DataSource(source="path", path=str(CHAT_SFT)), CHAT)
    assert 15 <= len(examples) <= 20
    first = json.loads(CHAT_SFT.read_text().splitlines()[1])["messages"]  # no system turn of its own
    ex = next(e for e in examples if e["messages"][1:] == first)
    assert ex["messages"][0] == {"role": "system", "content": R1_ZERO_SYSTEM}
    own = next(e for e in examples if e["messages"][0]["content"] == "You are a careful math tutor.")
    assert [m["role"] for m in own["messages"]] == ["system", "user", "assistant"]  # its own system turn kept
    (ids, start), = tokenize_examples(tok, [{"messages": ex["messages"]}], 1024)
    assert tok.decode(ids[:start]) == f"{R1_ZERO_SYSTEM}\nUser: {first[0]['content']}\nAssistant:"
    with pytest.raises(DataInputError, match="row 0 is a conversation: set prompt.style: chat"):
        load_cot_dataset(DataSource(source="path", path=str(CHAT_SFT)), PromptConfig())
    cfg = SFTConfig(max_steps=2, batch_size=4, warmup_steps=0, max_length=512)
    res = SFTTrainer(tiny_model(tok, max_position_embeddings=640), tok, examples, cfg, progress=False).train()
    assert res.steps == 2 and res.final_loss > 0


def save_classifier(tiny_model, tok, path, **config):
    model = tiny_model(tok, arch="qwen2_classifier", **{"num_labels": 1, **config})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_preference_fixture_fits_a_reward_model(tok, tiny_model, tmp_path):
    from rewards.reward_model import RewardModelScorer, train_bradley_terry

    pairs = load_preference_pairs(DataSource(source="path", path=str(PREFERENCES)), PromptConfig())
    assert len(pairs) == 19
    prompt, chosen, rejected = pairs[0]
    first = json.loads(PREFERENCES.read_text().splitlines()[0])
    assert (prompt, chosen, rejected) == (f"User: {first['prompt']}\nAssistant:", " " + first["chosen"],
                                          " " + first["rejected"])
    out = train_bradley_terry(tiny_model(tok, arch="qwen2_classifier", num_labels=1), tok, pairs, "answer", epochs=1,
                              batch_size=8, out_dir=tmp_path / "rm", max_length=256)
    scores = RewardModelScorer(out, max_length=256)([prompt], [chosen])
    assert len(scores) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataInputError, match="missing column\\(s\\) 'prompt'"):
        load_preference_pairs(DataSource(source="path", path=str(bad)), PromptConfig())


def test_reward_model_scores_any_one_label_classifier(tok, tiny_model, tmp_path):
    import torch

    from rewards import build_rewards
    from rewards.reward_model import RewardModelScorer

    path = save_classifier(tiny_model, tok, tmp_path / "rm")
    texts = [f"User: {a}+1\nAssistant: <answer>{a + 1}</answer>" * (1 + a % 3) for a in range(7)]
    one = RewardModelScorer(path, mode="full", batch_size=1).score(texts)
    many = RewardModelScorer(path, mode="full", batch_size=3).score(texts)
    assert one == pytest.approx(many, abs=1e-5) and len(set(one)) > 1  # batching (and padding) changes nothing
    half = RewardModelScorer(path, mode="full", batch_size=3, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.score(texts) == pytest.approx(one, abs=0.1)
    (_, fn, _), = build_rewards([{"name": "reward_model", "params": {"path": str(path), "batch_size": 2,
                                                                    "dtype": "float32", "mode": "full"}}])
    assert fn(texts[:3], ["", "", ""]) == pytest.approx(one[:3], abs=1e-5)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        RewardModelScorer(path, dtype="int8")
    two = save_classifier(tiny_model, tok, tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="has num_labels=2; a reward model scores with one output"):
        RewardModelScorer(two)
    pickled = tmp_path / "pickled"
    shutil.copytree(path, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        RewardModelScorer(pickled)


def test_preflight_refuses_chat_with_a_tokenizer_without_template(mini_recipe, mini_base, tmp_path):
    from stages.core.preflight import PreflightError, preflight

    model = tmp_path / "model"
    shutil.copytree(mini_base, model)
    for f in model.glob("chat_template.*"):
        f.unlink()
    cfg = model / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "chat_template"}))
    chat = mini_recipe.model_copy(update={"prompt": CHAT})
    with pytest.raises(PreflightError, match=f"input model: tokenizer in {model} has no chat template.*prompt.style "
                                             "is chat"):
        preflight(chat, ["r1_zero"], {"model": str(model)})
    preflight(mini_recipe, ["r1_zero"], {"model": str(model)})  # style template: no chat template needed
