"""The tiny base model: tokenizer round-trip, save/load, determinism, held-out split, flawed traces, loader checks."""

import random

import pytest
import torch

from stages.base_model import build_base_model
from stages.core.data import split_of
from stages.core.heldout import heldout_problems, pretraining_texts
from stages.core.models import ModelInputError, check_model_dir, load_model, load_tokenizer, resolve_model_uri
from stages.core.tasks import TraceNoise, clean_trace, make_problems, noisy_trace

TRICKY = [
    "User: 12+34\nAssistant: <think>2+4=6, write 6. 所以 答案 是 46.</think><answer>46</answer>",
    "  two  spaces,\n\nblank line,\ttab, trailing space ",
    "<think></think><answer></answer>",
    "中文混合English, 进位 1. emoji-free ümlaut café",
    "<think>nested <think>tags</think></think>",
]


@pytest.fixture(scope="module")
def mini_model_dir(tmp_path_factory):
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    recipe = load_recipe("tiny", MINI)
    out = tmp_path_factory.mktemp("mini") / "model"
    build_base_model(recipe, out, progress=False)
    return recipe, out


def test_tokenizer_roundtrips_through_auto_classes(mini_model_dir):
    from transformers import AutoTokenizer

    from stages.core.tokenizer import train_tokenizer

    _, path = mini_model_dir
    reloaded = AutoTokenizer.from_pretrained(path)
    fresh = train_tokenizer((p + c for p, c in pretraining_texts(mini_model_dir[0])), vocab_size=512)
    for text in TRICKY:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == fresh(text, add_special_tokens=False)["input_ids"], text
        assert reloaded.decode(ids, skip_special_tokens=True) == text  # tags and whitespace survive
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag not in reloaded.all_special_tokens  # or skip_special_tokens would strip them
    chat = reloaded.apply_chat_template([{"role": "user", "content": "1+2"}], tokenize=False,
                                        add_generation_prompt=True)
    assert chat == "User: 1+2\nAssistant:"


def test_saved_model_reloads_with_identical_outputs(mini_model_dir):
    from transformers import AutoModelForCausalLM

    _, path = mini_model_dir
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    tok = load_tokenizer(path)
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    a = load_model(path)
    assert a.config._attn_implementation == "sdpa"  # fused attention: no (L x L) scores kept for backward
    b = AutoModelForCausalLM.from_pretrained(path)
    ids = tok(["User: 3+4\nAssistant:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_build_is_deterministic_for_a_seed(tmp_path):
    from stages.core.recipe import load_recipe
    from tests.conftest import MINI

    recipe = load_recipe("tiny", MINI)
    r1 = build_base_model(recipe, tmp_path / "a", progress=False)
    r2 = build_base_model(recipe, tmp_path / "b", progress=False)
    assert r1.steps == r2.steps == 8 and r1.final_loss == r2.final_loss
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    other = build_base_model(load_recipe("tiny", {**MINI, "seed": 1}), tmp_path / "c", progress=False)
    c = load_model(other.path).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].shape == c[k].shape)


def test_heldout_questions_are_never_pretrained_on():
    from stages.core.recipe import load_recipe

    recipe = load_recipe("tiny", {"base_model.train_problems": 3000})
    held = heldout_problems(recipe, 100)
    assert len(held) == 100 and all(split_of(p.question) == "eval" for p in held)
    train_prompts = {p for p, _ in pretraining_texts(recipe)}
    assert not train_prompts & {recipe.prompt.template.format(question=p.question) for p in held}


def test_noisy_traces_have_the_configured_flaws():
    probs = make_problems("addition", 4000, seed=3)
    rng = random.Random(0)
    noise = TraceNoise(wrong_answer=0.3, no_tags=0.2, mixed_language=0.25)
    traces = [noisy_trace(p, rng, noise) for p in probs]
    tagged = [t for t in traces if t.endswith("</answer>")]
    no_tags = 1 - len(tagged) / len(traces)
    mixed = sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in traces) / len(traces)
    wrong = sum(not t.endswith(f"<answer>{p.answer}</answer>") for t, p in zip(traces, probs) if t in tagged)
    assert abs(no_tags - 0.2) < 0.03 and abs(mixed - 0.25) < 0.03
    assert abs(wrong / len(tagged) - 0.3) < 0.03
    # a clean trace is correct, well-formed and English; 37+48 carries once
    from stages.core.tasks import Problem, _addition_steps

    p = Problem("37+48", "85", "addition", _addition_steps(37, 48))
    assert clean_trace(p) == ("<think>7+8=15, write 5 carry 1. 3+4+1=8, write 8. so the answer is 85.</think>"
                              "<answer>85</answer>")


def test_model_dir_checks_name_what_is_missing(tmp_path, mini_model_dir):
    _, good = mini_model_dir
    assert check_model_dir(good, need_chat_template=True) == good
    with pytest.raises(ModelInputError, match="does not exist"):
        resolve_model_uri(str(tmp_path / "nope"))
    with pytest.raises(ModelInputError, match="not in the local cache, and HF_HUB_OFFLINE is set: download it"):
        resolve_model_uri("no-such-org/no-such-model")  # conftest sets HF_HUB_OFFLINE=1
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ModelInputError, match="config.json"):
        check_model_dir(bad)
    (bad / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelInputError, match="pickle weights are refused"):
        check_model_dir(bad)
    (bad / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelInputError, match="not a readable safetensors file"):
        check_model_dir(bad)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(bad / "model.safetensors"))
    with pytest.raises(ModelInputError, match="no tokenizer"):
        check_model_dir(bad)
    (bad / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelInputError, match="chat template"):
        check_model_dir(bad, need_chat_template=True)
