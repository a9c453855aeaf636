"""The shared SFT loop: masking, padding-aware batches, learning, exact resume, errors that name the example."""

import pytest
import torch

from stages.core.sft import SFTConfig, SFTTrainer, collate, length_grouped_order, tokenize_examples


@pytest.fixture(scope="module")
def tok():
    from stages.core.tasks import clean_trace, make_problems
    from stages.core.tokenizer import train_tokenizer

    probs = make_problems("addition", 300, seed=0)
    return train_tokenizer([f"User: {p.question}\nAssistant: {clean_trace(p)}" for p in probs], vocab_size=400)


SFT_MODEL = {"num_attention_heads": 2, "num_key_value_heads": 1}  # the tiny model with 2 heads (1 KV)


def test_collate_masks_prompt_and_padding():
    ids, labels, attn = collate([([5, 6, 7, 8], 2), ([9, 10], 1)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_length_grouped_batches_cover_data_with_less_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1024)]
    batches = length_grouped_order(lengths, 16, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1024)) and all(len(b) == 16 for b in batches)

    def waste(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(1024))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 16] for i in range(0, 1024, 16)]
    assert waste(batches) < 0.2 * waste(random_batches)
    assert batches != length_grouped_order(lengths, 16, seed=2)  # epochs differ


def test_tokenize_examples_adds_eos_and_names_bad_examples(tok):
    (ids, start), = tokenize_examples(tok, [{"prompt": "User: 1+2\nAssistant:", "completion": " 3"}], 64)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[start:-1]) == " 3"
    chat = tokenize_examples(tok, [{"messages": [{"role": "user", "content": "1+2"},
                                                 {"role": "assistant", "content": "3"}]}], 64)
    assert tok.decode(chat[0][0][: chat[0][1]]) == "User: 1+2\nAssistant:"
    with pytest.raises(ValueError, match="example 1 needs 'prompt' and 'completion'"):
        tokenize_examples(tok, [{"prompt": "a", "completion": "b"}, {"question": "x"}], 64)
    with pytest.raises(ValueError, match="example 0: prompt is .* tokens, max_length is 8"):
        tokenize_examples(tok, [{"prompt": "User: 12+34 and a much longer prompt", "completion": "b"}], 8)


def test_sft_learns_the_responses(tiny_model, tok):
    """A random model learns to answer three prompts with their fixed replies (greedy), response-only loss."""
    data = [{"prompt": f"User: {q}\nAssistant:", "completion": f" <answer>{a}</answer>"}
            for q, a in [("1+1", "2"), ("2+2", "4"), ("3+4", "7")]] * 8
    model = tiny_model(tok, **SFT_MODEL)
    cfg = SFTConfig(max_steps=60, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=5)
    res = SFTTrainer(model, tok, data, cfg, progress=False).train()
    assert res.steps == 60
    first, last = res.history[0]["sft/loss"], res.history[-1]["sft/loss"]
    assert last < 0.1 * first
    enc = tok(["User: 3+4\nAssistant:"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == "<answer>7</answer>"


def test_resume_continues_exactly(tiny_model, tok, tmp_path):
    from stages.core.tasks import clean_trace, make_problems

    data = [{"prompt": f"User: {p.question}\nAssistant:", "completion": " " + clean_trace(p)}
            for p in make_problems("addition", 40, seed=2)]
    cfg = SFTConfig(max_steps=6, batch_size=4, learning_rate=5e-3, warmup_steps=1, checkpoint_every=3)
    straight = tiny_model(tok, **SFT_MODEL)
    SFTTrainer(straight, tok, data, cfg, progress=False).train()

    first = tiny_model(tok, **SFT_MODEL)
    cut = SFTTrainer(first, tok, data, cfg.model_copy(update={"max_steps": 6}), output_dir=tmp_path, progress=False)
    cut.total_steps = 3  # stop after the first checkpoint, as a crash would
    cut.train()
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").exists()
    resumed = tiny_model(tok, seed=99, **SFT_MODEL)  # different init: everything must come from the checkpoint
    res = SFTTrainer(resumed, tok, data, cfg, output_dir=tmp_path, progress=False).train(resume_from="latest")
    assert res.steps == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
