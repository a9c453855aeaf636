"""The fast paths of a GRPO step give the reference paths' results: `grpo.fast.sample` (static KV cache, finished rows
dropped) against Hugging Face `generate`, and packed log-probs (the Hugging Face forward in length buckets, and the fast
path's shared-prompt pass) against the left-padded ones, loss and gradient included."""

import copy
import math

import pytest
import torch

import grpo.logprobs as lp
from grpo import fast
from grpo.logprobs import completion_logprobs, packed_completion_logprobs
from grpo.loss import grpo_loss
from grpo.rollout import HFGenerateBackend, SamplingParams, SeededSampling, completion_mask_from_eos, completion_seed
from tests.conftest import build_tiny_model

QUESTIONS = [(1, 2), (13, 52), (7, 8), (40, 41), (99, 1), (5, 55), (12, 21), (3, 30)]


@pytest.fixture(scope="module")
def prompts():
    # different lengths (left padding), and with the model below, greedy completions that end at different steps
    return [f"User: What is {a} + {b}?\nAssistant:" for a, b in QUESTIONS] + [
        "User: 7+8\nAssistant:",
        "User: Please add 3 and 4 now.\nAssistant:",
    ]


def model_for(tok, kind="qwen2", seed=0, eos_scale=4.0, dtype=torch.float32):
    """A random 2-layer model whose EOS logit is scaled up, so that rows end early, at different steps."""
    model = build_tiny_model(tok, seed, arch=kind, num_hidden_layers=2)
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] *= eos_scale
    return model.to(dtype).eval()


def encode(tok, prompts, repeat=1):
    enc = tok(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    return enc["input_ids"].repeat_interleave(repeat, 0), enc["attention_mask"].repeat_interleave(repeat, 0)


def masked(ids, eos):
    mask, _ = completion_mask_from_eos(ids, eos)
    return ids.masked_fill(mask == 0, -1), mask


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("compact", [True, False])
def test_greedy_tokens_equal_generate(tok, prompts, kind, compact):
    model = model_for(tok, kind)
    ids, mask = encode(tok, prompts)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    got = fast.sample(model, ids, mask, 24, tok.eos_token_id, tok.pad_token_id, do_sample=False, compact=compact)
    assert got.shape == ref.shape  # stops when every row has ended, like generate
    (a, ma), (b, _) = masked(ref, tok.eos_token_id), masked(got, tok.eos_token_id)
    assert torch.equal(a, b)
    if kind == "qwen2":  # rows really end at different steps, so compaction and early stop are exercised
        lengths = ma.sum(1)
        assert lengths.min() < lengths.max() == 24 and len(set(lengths.tolist())) >= 3


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_seeded_sampling_equals_generate_with_the_same_row_seeds(tok, prompts, temperature, top_p):
    """With per-row seeds the draw is a function of the row's own stream: the same tokens as the `generate` path
    (SeededSampling), although finished rows leave the fast batch."""
    model = model_for(tok)
    ids, mask = encode(tok, prompts, repeat=3)
    seeds = [completion_seed(100 + i // 3, i % 3) for i in range(len(ids))]
    from transformers import LogitsProcessorList

    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         logits_processor=LogitsProcessorList([SeededSampling(seeds, temperature, top_p, "cpu")]))
    ref = ref[:, ids.shape[1]:]
    got = fast.sample(model, ids, mask, 20, tok.eos_token_id, tok.pad_token_id, temperature=temperature,
                      top_p=top_p, row_seeds=seeds)
    (a, ma), (b, _) = masked(ref, tok.eos_token_id), masked(got, tok.eos_token_id)
    assert torch.equal(a[:, : b.shape[1]], b) and a.shape[1] == b.shape[1]
    assert ma.sum(1).min() < 20  # some rows ended early


def test_backend_seeds_give_the_same_rollout_on_both_paths(tok, prompts):
    model = model_for(tok)
    sp = SamplingParams(temperature=0.9, max_new_tokens=16)
    quick, slow = HFGenerateBackend(model, tok), HFGenerateBackend(model, tok, fast_decoding=False)
    assert quick.uses_fast_decoding() and not slow.uses_fast_decoding()
    a = quick.generate(prompts[:4], 3, sp, seeds=[1, 2, 3, 4])
    b = slow.generate(prompts[:4], 3, sp, seeds=[1, 2, 3, 4])
    assert a.completions == b.completions
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.completion_ids, b.completion_ids)


@pytest.mark.parametrize("seeded", [True, False])
def test_generate_fallback_ignores_the_models_generation_config(tok, prompts, seeded):
    """A checkpoint's generation_config (repetition penalty, n-gram ban, min length, suppressed tokens) must not change
    what the `generate` fallback samples: its tokens equal the fast path's, which applies none of them."""
    model = model_for(tok)
    model.generation_config.update(repetition_penalty=2.0, no_repeat_ngram_size=2, min_new_tokens=4, top_k=5,
                                   suppress_tokens=[tok.pad_token_id])
    quick, slow = HFGenerateBackend(model, tok), HFGenerateBackend(model, tok, fast_decoding=False)
    if seeded:  # seeded sampling: same streams on both paths
        sp = SamplingParams(temperature=0.9, max_new_tokens=16)
        a, b = quick.generate(prompts[:4], 3, sp, seeds=[1, 2, 3, 4]), slow.generate(prompts[:4], 3, sp, seeds=[1, 2, 3, 4])
    else:  # greedy
        sp = SamplingParams(max_new_tokens=16, do_sample=False)
        a, b = quick.generate(prompts, 1, sp), slow.generate(prompts, 1, sp)
        assert a.lengths.min() < 4  # a row ends within min_new_tokens: the fallback must end it too
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completions == b.completions
    assert model.generation_config.repetition_penalty == 2.0  # the model's config is left as it was


def test_a_second_eos_id_of_the_generation_config_ends_rows_on_both_paths(tok, prompts):
    """generation_config.eos_token_id may be a list: the fast path and the generate fallback both stop on each id,
    and the completion mask ends at it (the row is not truncated)."""
    model = model_for(tok, eos_scale=1.0)
    sp = SamplingParams(max_new_tokens=16)  # seeded: the same draws on both paths and in both runs
    plain = HFGenerateBackend(model, tok).generate(prompts[:4], 2, sp, seeds=[1, 2, 3, 4])
    i, row = next((i, r) for i, r in enumerate(plain.completion_ids.tolist()) if len(set(r[:8])) > 2)
    k = next(k for k in range(1, len(row)) if row[k] not in row[:k])  # the first occurrence of a token
    model.generation_config.eos_token_id = [tok.eos_token_id, row[k]]
    for backend in (HFGenerateBackend(model, tok), HFGenerateBackend(model, tok, fast_decoding=False)):
        r = backend.generate(prompts[:4], 2, sp, seeds=[1, 2, 3, 4])
        assert r.completion_ids[i, : k + 1].tolist() == row[: k + 1]
        assert r.lengths[i] == k + 1 and not r.truncated[i] and r.completion_mask[i].sum() == k + 1


def test_draw_follows_the_probabilities():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0]).repeat(40_000, 1)
    counts = torch.bincount(fast.draw(probs), minlength=6).float() / 40_000
    assert counts[1] == 0 and counts[5] == 0  # probability 0: never drawn, the last token included
    assert torch.allclose(counts, probs[0], atol=0.01)


def test_sampled_first_tokens_follow_the_model(tok, prompts):
    """The unseeded fast path samples from softmax(logits / T): empirical first-token frequencies match it."""
    model = model_for(tok, eos_scale=1.0)
    with torch.no_grad():  # sharpen the distribution a little, so that frequent tokens are measured well
        model.model.norm.weight.mul_(8.0)
    n = 4000
    ids, mask = encode(tok, prompts[1:2], repeat=n)
    torch.manual_seed(0)
    first = fast.sample(model, ids, mask, 1, tok.eos_token_id, tok.pad_token_id, temperature=0.8)[:, 0]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1] / 0.8, dim=-1)
    freq = torch.bincount(first, minlength=p.numel()).float() / n
    assert p.max() > 0.2
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()  # every token within 5 sigma


def test_fast_rollout_masks_after_eos_and_counts_lengths(tok, prompts):
    model = model_for(tok)
    torch.manual_seed(3)
    r = HFGenerateBackend(model, tok).generate(prompts, 2, SamplingParams(max_new_tokens=20))
    eos = tok.eos_token_id
    for row, m, n, trunc in zip(r.completion_ids, r.completion_mask, r.lengths, r.truncated):
        k = int(n)
        assert m[:k].all() and not m[k:].any()
        assert (row[k:] == tok.pad_token_id).all()
        assert bool(trunc) == (row[k - 1] != eos)
    assert r.truncated.any() and not r.truncated.all()


def test_unsupported_models_fall_back_to_generate(tok):
    model = model_for(tok)
    model.config.hidden_act = "gelu"
    assert fast.unsupported_reason(model) == "hidden_act 'gelu' is not silu"
    assert not HFGenerateBackend(model, tok).uses_fast_decoding()
    assert not HFGenerateBackend(model_for(tok), tok, synced_gpus=True).uses_fast_decoding()


# Log-prob tolerance per dtype against the Hugging Face forward in the same dtype. bf16 keeps 8 significant bits
# (eps 2^-8 = 0.0039), fp16 11 (eps 2^-11 = 0.00049); a log-prob comes out of a few dozen roundings of O(1)
# activations summed in a different order (shared prompt keys, length buckets), so ~4 eps: 0.016 and 0.002.
LOGP_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fast_logprobs_match_the_reference_in_each_dtype(tok, prompts, dtype):
    """The shared-prompt pass in bf16/fp16 (it crashed there: a float32 mask into bf16 scores) gives the reference's
    log-probs in the same dtype, and is no further from the fp32 answer than the reference itself is."""
    _, r = batch_for(tok, prompts)
    model = model_for(tok, dtype=dtype).train()
    model.set_attn_implementation("eager")
    T, m = r.completion_ids.shape[1], r.completion_mask.bool()
    assert fast.use_fast_path(model)
    ref, _ = completion_logprobs(model, r.input_ids, r.attention_mask, T)
    exact, _ = completion_logprobs(model_for(tok), r.input_ids, r.attention_mask, T)
    got, ent = fast.shared_prompt_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert got.dtype == torch.float32 and got[m].isfinite().all() and ent[m].isfinite().all()
    assert (got[m] - ref[m]).abs().max() <= LOGP_ATOL[dtype]
    assert (got[m] - exact[m]).abs().max() <= 2 * (ref[m] - exact[m]).abs().max() + 1e-5
    grads = torch.autograd.grad(got[m].sum(), list(model.parameters()))
    assert all(g.dtype == dtype and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_greedy_tokens_equal_generate_in_low_precision(tok, prompts, dtype):
    """In bf16/fp16 the decoder rounds where the Hugging Face modules round (projection, then residual add; softmax in
    fp32), so greedy tokens equal `generate`'s with eager attention. (SDPA keeps the scores in fp32 inside its kernel:
    against it tokens can part at near-ties of two logits.)"""
    model = model_for(tok, dtype=dtype)
    model.set_attn_implementation("eager")
    ids, mask = encode(tok, prompts)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    got = fast.sample(model, ids, mask, 24, tok.eos_token_id, tok.pad_token_id, do_sample=False)
    (a, ma), (b, _) = masked(ref, tok.eos_token_id), masked(got, tok.eos_token_id)
    assert got.shape == ref.shape and torch.equal(a, b)
    assert len(set(ma.sum(1).tolist())) >= 3  # rows end at different steps: compaction is exercised


def test_a_grpo_step_in_bf16_runs_the_fast_path(tok, prompts):
    """A whole GRPOTrainer step (sampling, reference and policy log-probs, backward, AdamW) on a bf16 model on CPU."""
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer

    model = model_for(tok, dtype=torch.bfloat16).train()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = GRPOConfig(prompts_per_step=4, num_generations=4, steps_per_iteration=1, beta=0.04, mu=2,
                     learning_rate=1e-2, max_completion_length=12, max_prompt_length=32)
    trainer = GRPOTrainer(model, tok, cfg, [{"prompt": p} for p in prompts],
                          [("length", lambda p, c, **k: [float(len(x)) for x in c], 1.0)], progress=False)
    assert trainer.backend.uses_fast_decoding() and fast.use_fast_path(model)
    (metrics,) = trainer.train()
    assert metrics["skipped_steps"] == 0 and math.isfinite(metrics["loss"]) and math.isfinite(metrics["kl"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_weights_in_an_untested_dtype_take_the_reference_path(tok, caplog):
    model = model_for(tok, dtype=torch.float64)
    assert fast.unsupported_reason(model) == "weights in float64 (the fast path runs one of float32, bfloat16, float16)"
    mixed = model_for(tok)
    mixed.model.norm.to(torch.bfloat16)
    assert "weights in bfloat16, float32" in fast.unsupported_reason(mixed)
    assert not HFGenerateBackend(model, tok).uses_fast_decoding()


def test_dispatch_logs_one_line_per_model_class_and_reason(tok, caplog):
    """One decision for sampling and log-probs, announced once per process per (model class, reason)."""
    model = model_for(tok)
    model.__class__ = type("AnnouncedQwen2", (type(model),), {})  # a class no other test has announced
    with caplog.at_level("INFO", logger="grpo.fast"):
        assert fast.use_fast_path(model) and fast.use_fast_path(model)
        assert HFGenerateBackend(model, tok).uses_fast_decoding()
        assert not HFGenerateBackend(model, tok, fast_decoding=False).uses_fast_decoding()
        model.config.hidden_act = "gelu"
        assert not fast.use_fast_path(model) and not HFGenerateBackend(model, tok).uses_fast_decoding()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AnnouncedQwen2")]
    assert len(lines) == 3, lines
    assert "fast path" in lines[0]
    assert "reference" in lines[1] and "fast_decoding=False" in lines[1]
    assert "reference" in lines[2] and "hidden_act 'gelu' is not silu" in lines[2]


def batch_for(tok, prompts, seed=0):
    """A sampled rollout batch of 50 rows (several length buckets), from a model in train mode."""
    model = model_for(tok, seed=seed)
    torch.manual_seed(seed)
    r = HFGenerateBackend(model, tok).generate(prompts, 5, SamplingParams(temperature=0.9, max_new_tokens=20))
    return model.train(), r


def test_packed_logprobs_equal_the_padded_ones(tok, prompts):
    model, r = batch_for(tok, prompts)
    T = r.completion_ids.shape[1]
    m = r.completion_mask.bool()
    assert r.lengths.min() < T and r.prompt_mask.sum(1).min() < r.prompt_ids.shape[1]  # padding on both sides
    ref, ref_ent = completion_logprobs(model, r.input_ids, r.attention_mask, T, temperature=0.9)
    for packed in (packed_completion_logprobs, fast.shared_prompt_logprobs):
        args = (model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        got, ent = packed(*args, temperature=0.9, chunk_size=64)
        assert torch.allclose(got[m], ref[m], atol=1e-5)
        assert torch.allclose(ent[m], ref_ent[m], atol=1e-5)
        assert (got[~m] == 0).all()
        frozen, _ = packed(*args, temperature=0.9, with_entropy=False)
        assert torch.allclose(frozen[m], ref[m], atol=1e-5)


@pytest.mark.parametrize("packed", [packed_completion_logprobs, fast.shared_prompt_logprobs])
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "dr_grpo"])
def test_packed_logprobs_give_the_same_loss_and_gradient(tok, prompts, aggregation, packed):
    model, r = batch_for(tok, prompts, seed=1)
    T = r.completion_ids.shape[1]
    adv = torch.linspace(-1.5, 1.5, len(r.completion_ids))
    ref_logp = torch.full((len(adv), T), -3.0)

    def loss_and_grad(logp):
        loss, _ = grpo_loss(logp, logp.detach() - 0.05, adv, r.completion_mask, logp_ref=ref_logp, beta=0.1,
                            aggregation=aggregation, max_len=T)
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        return loss.detach(), grads

    a, ga = loss_and_grad(completion_logprobs(model, r.input_ids, r.attention_mask, T)[0])
    b, gb = loss_and_grad(
        packed(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)[0]
    )
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_the_chunked_lm_head_above_the_threshold_gives_the_same_gradient(tok, prompts, monkeypatch):
    model, r = batch_for(tok, prompts)
    args = (model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)

    def grads():
        logp, _ = fast.shared_prompt_logprobs(*args, chunk_size=32)
        return torch.autograd.grad(logp.sum(), list(model.parameters()))

    plain = grads()
    monkeypatch.setattr(lp, "CHECKPOINT_ABOVE", 0)
    for x, y in zip(plain, grads()):
        assert torch.allclose(x, y, atol=1e-6)


def lm_head_case(dtype, vocab=3000, hidden=32, n=160, bias=False):
    """An LM head, hidden states predicting random tokens, and per-position loss weights of both signs (advantages)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype)
    h = torch.randn(1, n, hidden, dtype=dtype, requires_grad=True)
    return head, h, torch.randint(0, vocab, (1, n)), torch.linspace(-1, 1, n)


def head_logprobs(head, h, tokens, weights, monkeypatch, chunked: bool):
    """(logp, entropy, gradients of Σ weight·logp w.r.t. h and the head's parameters), through the chunked head
    (`ChunkedLMHead`, chunks of 64 positions, vocabulary tiles of 700 on the CPU) or plain autograd over the whole
    logits."""
    monkeypatch.setattr(lp, "CHECKPOINT_ABOVE", 0 if chunked else 2**62)
    monkeypatch.setattr(lp, "VOCAB_TILE", 700)
    logp, ent = lp.chosen_token_logprobs(h, head, tokens, temperature=0.7, chunk_size=64)
    return logp, ent, torch.autograd.grad((logp * weights).sum(), [h, *head.parameters()])


def test_the_chunked_lm_head_equals_autograd_in_fp32(monkeypatch):
    """Values, entropy and gradients (hidden states, weight, bias) of the chunked head equal plain autograd's over the
    full logits, over chunks and tiles that do not divide the positions and the vocabulary."""
    case = lm_head_case(torch.float32, bias=True)
    a, b = head_logprobs(*case, monkeypatch, True), head_logprobs(*case, monkeypatch, False)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    assert len(a[2]) == 3
    for x, y in zip(a[2], b[2]):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_the_chunked_lm_head_in_bf16_is_no_further_from_the_exact_gradient_than_autograd(monkeypatch):
    """bf16 weights: the log-probs are autograd's (the same bf16 logits, then fp32), and the gradients, whose GEMMs
    run in fp32 on the CPU, are within a bf16 rounding of the exact gradient (fp64 through the same weights) and no
    further from it than autograd's bf16 GEMMs are."""
    head, h, tokens, weights = case = lm_head_case(torch.bfloat16)
    logp, ent, grads = head_logprobs(*case, monkeypatch, True)
    ref_logp, ref_ent, ref_grads = head_logprobs(*case, monkeypatch, False)
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    h64, w64 = h.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    exact = torch.log_softmax(h64 @ w64.T / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    exact_grads = torch.autograd.grad((exact * weights.double()).sum(), [h64, w64])
    for g, ref, x in zip(grads, ref_grads, exact_grads):
        assert g.dtype == torch.bfloat16
        err, ref_err = ((g.double() - x).abs().max() / x.abs().max()), ((ref.double() - x).abs().max() / x.abs().max())
        assert err <= 2**-8 and err <= ref_err, (err, ref_err)


def test_the_chunked_lm_head_keeps_no_logits_and_no_bf16_gemm_over_the_vocabulary(monkeypatch):
    """What autograd keeps holds no chunk of logits, and no GEMM sums over the vocabulary in bf16: on a CPU without
    AVX512-BF16 that GEMM (the hidden states' gradient) took 41 s for 256 positions at Qwen's vocabulary, 0.3 s in
    fp32, and made our GRPO step 11x slower than TRL's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    head, h, tokens, weights = lm_head_case(torch.bfloat16)
    vocab, n = head.out_features, h.shape[1]
    gemms = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    slow = []  # (shapes) of bf16 GEMMs whose reduction dimension is the vocabulary

    class Gemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in gemms:
                a = args[-2]
                if a.dtype == torch.bfloat16 and a.shape[1] == vocab:
                    slow.append([tuple(x.shape) for x in args if isinstance(x, torch.Tensor)])
            return func(*args, **(kwargs or {}))

    big = []

    def pack(t):
        if t.numel() >= 64 * vocab:  # one chunk of logits
            big.append(tuple(t.shape))
        return t

    monkeypatch.setattr(lp, "CHECKPOINT_ABOVE", 0)
    monkeypatch.setattr(lp, "VOCAB_TILE", 700)
    with Gemms(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = lp.chosen_token_logprobs(h, head, tokens, temperature=0.7, chunk_size=64)
        (logp * weights).sum().backward()
    assert not slow and not big, (slow, big)
    assert h.grad.shape == (1, n, h.shape[2]) and head.weight.grad.isfinite().all()


def test_trainer_update_matches_padded_logprobs(tok, prompts):
    """One policy update through the trainer (packed path) has the gradient of the padded path's loss."""
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer

    model, r = batch_for(tok, prompts, seed=2)
    cfg = GRPOConfig(prompts_per_step=len(prompts), num_generations=5, beta=0.0, learning_rate=1e-2,
                     max_completion_length=20, max_grad_norm=None)
    dataset = [{"prompt": p} for p in prompts]
    adv = torch.linspace(-1, 1, len(r.completion_ids))
    reference = copy.deepcopy(model)
    trainer = GRPOTrainer(model, tok, cfg, dataset, [("zero", lambda p, c, **k: [0.0] * len(c), 1.0)],
                          progress=False)
    grads = []
    step = trainer.engine.step

    def step_and_record():
        grads.append([p.grad.clone() for p in model.parameters()])
        return step()

    trainer.engine.step = step_and_record
    trainer.policy_update(r, adv)

    logp, _ = completion_logprobs(reference, r.input_ids, r.attention_mask, r.completion_ids.shape[1])
    loss, _ = grpo_loss(logp, logp.detach(), adv, r.completion_mask, aggregation=cfg.loss_aggregation)
    loss.backward()
    assert len(grads) == 1
    for (name, _), g, q in zip(model.named_parameters(), grads[0], reference.parameters()):
        assert torch.allclose(g, q.grad, rtol=1e-4, atol=1e-7), name


def test_the_training_pass_keeps_no_attention_scores_for_backward(tok):
    """What autograd saves of the shared-prompt pass holds one O(L x S) tensor, the additive mask shared by every layer
    and head; per-head (L x S) scores or probabilities (4 heads x 2 layers of them here, gigabytes at real lengths)
    must not be kept."""
    model = build_tiny_model(tok, num_hidden_layers=2, max_position_embeddings=1024).train()
    n, P, T = 2, 8, 400
    torch.manual_seed(0)
    prompt, completion = torch.randint(3, len(tok), (1, P)).repeat(n, 1), torch.randint(3, len(tok), (n, T))
    L, S = T - 1, P + T - 1  # the completion pass: queries, keys
    big = {}  # bytes of each saved storage holding at least one (L x S) matrix's elements

    def pack(t):
        if t.numel() >= L * S:
            big[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = fast.shared_prompt_logprobs(model, prompt, torch.ones_like(prompt), completion,
                                              torch.ones_like(completion), chunk_size=64)
    assert sum(big.values()) == n * L * S * 4, big  # the fp32 mask, once (probabilities kept per layer: 8 times it)
    logp.sum().backward()  # and the backward runs from what was kept
    assert all(p.grad.isfinite().all() for p in model.parameters())
