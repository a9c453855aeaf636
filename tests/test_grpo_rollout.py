"""Rollout backend: grouping, padding, EOS masks, truncation, decoding, bad inputs."""

import pytest
import torch

from grpo.rollout import (
    HFGenerateBackend,
    Rollout,
    RolloutBackend,
    SamplingParams,
    completion_mask_from_eos,
    eos_token_ids,
    rollout_from_completions,
)
from stages.core.tasks import clean_trace, make_problems
from stages.core.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    problems = make_problems("addition", 200, seed=0)
    texts = [f"User: {p.question}\nAssistant:{clean_trace(p)}" for p in problems]
    return train_tokenizer(texts, vocab_size=320)


def test_completion_mask_from_eos():
    eos = 7
    ids = torch.tensor([[1, 2, 7, 3], [7, 1, 1, 1], [1, 2, 3, 4]])
    mask, truncated = completion_mask_from_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_every_eos_id_ends_a_completion(tiny_model, tok):
    ids = torch.tensor([[1, 9, 7, 3], [7, 1, 9, 1], [1, 2, 3, 4]])
    mask, truncated = completion_mask_from_eos(ids, [7, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    model = tiny_model(tok)
    model.generation_config.eos_token_id = [9, tok.eos_token_id, 11]
    assert eos_token_ids(model, tok) == [tok.eos_token_id, 9, 11]  # the tokenizer's first, no repeats
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tok) == [tok.eos_token_id] == eos_token_ids(None, tok)


def test_generate_groups_masks_and_texts(tiny_model, tok):
    model = tiny_model(tok)
    backend = HFGenerateBackend(model, tok, max_prompt_length=32)
    assert isinstance(backend, RolloutBackend)
    prompts = ["User: 1+2\nAssistant:", "User: 13+45\nAssistant:"]
    torch.manual_seed(0)
    r = backend.generate(prompts, num_generations=3, sampling=SamplingParams(temperature=1.0, max_new_tokens=12))
    assert isinstance(r, Rollout)
    N = 6
    assert r.prompts == [prompts[0]] * 3 + [prompts[1]] * 3
    assert r.prompt_ids.shape[0] == N and r.completion_ids.shape[0] == N
    assert r.completion_ids.shape[1] <= 12
    # left padding: the shorter prompt's first positions are pad with mask 0
    assert r.prompt_mask[0, 0] == 0 and r.prompt_ids[0, 0] == tok.pad_token_id
    assert r.prompt_mask[:, -1].all()
    for i in range(N):
        row, m = r.completion_ids[i], r.completion_mask[i]
        L = int(r.lengths[i])
        assert m[:L].all() and not m[L:].any()
        assert (row[L:] == tok.pad_token_id).all()
        eos_pos = (row == tok.eos_token_id).nonzero().flatten().tolist()
        if r.truncated[i]:
            assert eos_pos == [] and L == 12
        else:
            assert eos_pos == [L - 1]
        assert r.completions[i] == tok.decode(row[:L], skip_special_tokens=True)
    assert r.input_ids.shape == r.attention_mask.shape


def test_eos_and_truncation_both_happen(tiny_model, tok):
    model = tiny_model(tok)
    with torch.no_grad():  # zero (tied) embeddings: every next token uniform over the vocab
        model.lm_head.weight.zero_()
    backend = HFGenerateBackend(model, tok)
    torch.manual_seed(1)
    r = backend.generate(["User: 1+2\nAssistant:"], num_generations=64, sampling=SamplingParams(max_new_tokens=200))
    # uniform over the vocab: P(no EOS in 200 tokens) ~ (1-1/V)^200, so some end and some are truncated
    assert r.truncated.any() and (~r.truncated).any()
    assert (r.lengths[r.truncated] == 200).all()


def test_greedy_is_deterministic_and_same_within_group(tiny_model, tok):
    model = tiny_model(tok)
    backend = HFGenerateBackend(model, tok)
    sp = SamplingParams(max_new_tokens=8, do_sample=False)
    a = backend.generate(["User: 3+4\nAssistant:"], 2, sp)
    b = backend.generate(["User: 3+4\nAssistant:"], 2, sp)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])


def test_tags_survive_decoding(tok):
    ids = tok("<think>1+2=3</think><answer>3</answer>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids + [tok.eos_token_id]])
    assert tok.batch_decode(ids, skip_special_tokens=True)[0] == "<think>1+2=3</think><answer>3</answer>"


def test_prompt_too_long_names_length_and_limit(tiny_model, tok):
    backend = HFGenerateBackend(tiny_model(tok), tok, max_prompt_length=4)
    with pytest.raises(ValueError, match=r"over max_prompt_length=4"):
        backend.generate(["User: 12+34\nAssistant:"], 2, SamplingParams(max_new_tokens=2))


def test_tokenizer_without_pad_or_eos_is_rejected(tiny_model, tok):
    class NoPad:
        eos_token_id = 1
        pad_token_id = None

    with pytest.raises(ValueError, match="no pad"):
        HFGenerateBackend(tiny_model(tok), NoPad())


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_rollout_from_completions(tok):
    r = rollout_from_completions(tok, ["User: 1+2\nAssistant:"], ["<think>3</think>", "<answer>3</answer> x"], 2)
    assert r.completions == ["<think>3</think>", "<answer>3</answer> x"]
    assert not r.truncated.any()
    for i in range(2):
        L = int(r.lengths[i])
        assert r.completion_ids[i, L - 1] == tok.eos_token_id and r.completion_mask[i, :L].all()
    with pytest.raises(ValueError, match="need 1 x 2 completions"):
        rollout_from_completions(tok, ["p"], ["only one"], 2)
