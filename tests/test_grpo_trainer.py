"""The training loop on a tiny model: learning, μ=1 vs μ>1, EOS masking, log-probs, rewards, process mode, logging."""

import copy
import math

import pytest
import torch

from grpo.advantages import EPS
from grpo.config import GRPOConfig
from grpo.logging import ConsoleLogger, MetricLogger, MLflowLogger
from grpo.logprobs import completion_logprobs, position_ids_from_mask
from grpo.loss import grpo_loss
from grpo.rewards_io import RewardError, char_offsets_to_token_ends
from grpo.rollout import rollout_from_completions
from grpo.trainer import GRPOTrainer, PromptSampler
from stages.core.tasks import make_problems


@pytest.fixture(scope="module")
def dataset():
    return [{"prompt": f"User: {p.question}\nAssistant:", "answer": p.answer} for p in make_problems("addition", 64, 1)]


def think_fraction(tok):
    def reward(prompts, completions, **columns):
        assert len(columns["answer"]) == len(completions)  # dataset columns arrive repeated per completion
        return [c.count("<think>") / max(1, len(tok(c, add_special_tokens=False)["input_ids"])) for c in completions]

    return reward


def small_config(**kw):
    base = {
        "prompts_per_step": 2,
        "num_generations": 4,
        "steps_per_iteration": 2,
        "beta": 0.0,
        "learning_rate": 1e-2,
        "max_completion_length": 8,
        "max_prompt_length": 32,
        "seed": 0,
    }
    return GRPOConfig(**{**base, **kw})


def test_chosen_token_logprobs_match_full_log_softmax(tiny_model):
    m = tiny_model(vocab_size=300)
    ids = torch.randint(0, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # after EOS
    logp, ent = completion_logprobs(m, ids, mask, completion_len=4, temperature=0.7, chunk_size=5)
    logits = m(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits / 0.7
    full = torch.log_softmax(logits[:, -5:-1].float(), -1)
    ref = full.gather(-1, ids[:, -4:, None]).squeeze(-1)
    assert torch.allclose(logp, ref, atol=1e-5)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-4)
    # gradients through the chunked, checkpointed path equal those of the full computation
    g1 = torch.autograd.grad(logp.sum(), m.lm_head.weight)[0]
    g2 = torch.autograd.grad(ref.sum(), m.lm_head.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_policy_learns_toy_reward(tiny_model, tok, dataset):
    cfg = small_config(prompts_per_step=4, steps_per_iteration=30, learning_rate=3e-2, max_completion_length=12)
    logger = ConsoleLogger(printer=lambda s: None)
    trainer = GRPOTrainer(
        tiny_model(tok), tok, cfg, dataset, [("think", think_fraction(tok), 1.0)], logger=logger, progress=False
    )
    history = trainer.train()
    rewards = [m["reward/mean"] for m in history]
    assert len(logger.history) == 30
    assert sum(rewards[:5]) / 5 < 0.1
    assert sum(rewards[-5:]) / 5 > 0.6, rewards


def test_mu1_equals_first_update_of_mu2_and_skips_old_logprobs(tiny_model, tok, dataset):
    model = tiny_model(tok)
    ref_trainer = GRPOTrainer(
        copy.deepcopy(model), tok, small_config(), dataset, [("think", think_fraction(tok), 1.0)], progress=False
    )
    torch.manual_seed(3)
    rollout = ref_trainer.backend.generate([r["prompt"] for r in dataset[:2]], 4, ref_trainer.sampling)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, -1.0])
    results = {}
    for mu in (1, 2):
        trainer = GRPOTrainer(
            copy.deepcopy(model),
            tok,
            small_config(mu=mu, beta=0.04),
            dataset,
            [("think", think_fraction(tok), 1.0)],
            progress=False,
        )
        trainer.reference = trainer.engine.make_reference()
        calls = []  # passes of the policy itself (the reference's are not counted)
        policy_logprobs = trainer.logprobs

        def counted(model, *a, calls=calls, policy=trainer.engine.module, inner=policy_logprobs, **k):
            calls.extend([1] if model is policy else [])
            return inner(model, *a, **k)

        trainer.logprobs = counted
        trainer.policy_update(rollout, adv)
        params = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
        results[mu] = (trainer.last_update_stats, len(calls), params)
    (s1, calls1, p1), (s2, calls2, _) = results[1], results[2]
    assert calls1 == 1  # μ = 1: no separate forward for the old log-probs
    assert calls2 == 3  # μ = 2: old log-probs once, then two updates
    for key in ("loss", "grad_norm", "kl", "clip_low", "clip_high"):
        assert math.isclose(s1[key][0], s2[key][0], rel_tol=1e-5, abs_tol=1e-7), key
    assert s2["clip_low"][0] == s2["clip_high"][0] == 0  # first update: ratio 1
    # the μ=1 update equals the μ=2 first update: same parameters as a μ=2 run cut after one update
    trainer = GRPOTrainer(
        copy.deepcopy(model),
        tok,
        small_config(mu=2, beta=0.04),
        dataset,
        [("think", think_fraction(tok), 1.0)],
        progress=False,
    )
    trainer.reference = trainer.engine.make_reference()
    original_step = trainer.engine.step
    snapshots = []

    def step_and_snapshot():
        norm = original_step()
        snapshots.append({k: v.clone() for k, v in trainer.engine.module.state_dict().items()})
        return norm

    trainer.engine.step = step_and_snapshot
    trainer.policy_update(rollout, adv)
    for k in p1:
        assert torch.allclose(p1[k], snapshots[0][k], atol=1e-6), k


def loss_on(trainer, rollout, adv):
    """Loss and gradient with a ratio away from 1 and a KL term, so both depend on every unmasked log-prob."""
    model = trainer.engine.module
    logp, _ = trainer.logprobs(model, rollout, slice(None))
    loss, _ = grpo_loss(
        logp,
        logp.detach() - 0.05,
        adv,
        rollout.completion_mask,
        logp_ref=torch.full_like(logp, -3.0),
        beta=0.1,
        aggregation="sequence_mean",
    )
    grad = torch.autograd.grad(loss, model.lm_head.weight)[0]
    return loss.detach(), grad


def test_tokens_after_eos_do_not_change_the_loss(tiny_model, tok, dataset):
    trainer = GRPOTrainer(
        tiny_model(tok),
        tok,
        small_config(max_completion_length=16),
        dataset,
        [("think", think_fraction(tok), 1.0)],
        progress=False,
    )
    torch.manual_seed(0)
    rollout = trainer.backend.generate([dataset[0]["prompt"]], 4, trainer.sampling)
    # make rows end early: EOS at position 2 of rows 0 and 1
    rollout.completion_ids[:2, 2] = tok.eos_token_id
    rollout.completion_mask[:2] = (torch.arange(rollout.completion_ids.shape[1]) <= 2).long()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    (a, ga) = loss_on(trainer, rollout, adv)
    changed = copy.deepcopy(rollout)
    changed.completion_ids[:2, 3:] = torch.randint(0, len(tok), changed.completion_ids[:2, 3:].shape)
    (b, gb) = loss_on(trainer, changed, adv)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6) and a != 0
    # sanity: changing a token before EOS does change the loss
    changed.completion_ids[0, 1] = (changed.completion_ids[0, 1] + 1) % len(tok)
    assert not torch.allclose(loss_on(trainer, changed, adv)[0], a, atol=1e-6)


def test_reward_errors_name_the_function_and_a_sample(tiny_model, tok, dataset):
    def wrong_length(prompts, completions, **kw):
        return [0.0]

    def nan_reward(prompts, completions, **kw):
        return [float("nan")] + [0.0] * (len(completions) - 1)

    for name, fn, pattern in [
        ("short", wrong_length, r"'short': returned 1 values for 8 completions"),
        ("nanny", nan_reward, r"'nanny': returned nan .*\n  sample 0:\n    prompt: 'User: "),
    ]:
        trainer = GRPOTrainer(tiny_model(tok), tok, small_config(), dataset, [(name, fn, 1.0)], progress=False)
        with pytest.raises(RewardError, match=pattern):
            trainer.train()
        assert trainer.global_step == 0


def test_bad_trainer_inputs(tiny_model, tok, dataset):
    with pytest.raises(ValueError, match="no 'prompt' column"):
        GRPOTrainer(tiny_model(tok), tok, small_config(), [{"question": "1+1"}], [("r", think_fraction(tok), 1.0)])
    with pytest.raises(ValueError, match="unique"):
        f = think_fraction(tok)
        GRPOTrainer(tiny_model(tok), tok, small_config(), dataset, [("r", f, 1.0), ("r", f, 1.0)])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        GRPOTrainer(tiny_model(tok), tok, small_config(), dataset, [("r", think_fraction(tok), float("nan"))])
    long = [{"prompt": "User: " + "1+1 " * 40 + "\nAssistant:"}]
    trainer = GRPOTrainer(tiny_model(tok), tok, small_config(), long, [("r", think_fraction(tok), 1.0)], progress=False)
    with pytest.raises(ValueError, match=r"tokens long, over max_prompt_length=32"):
        trainer.train()


def test_metrics_and_reference_only_with_beta(tiny_model, tok, dataset):
    def accuracy(prompts, completions, answer, **kw):
        return [float(a in c) for a, c in zip(answer, completions)]

    funcs = [("accuracy", accuracy, 1.0), ("think", think_fraction(tok), 0.5)]
    t0 = GRPOTrainer(tiny_model(tok), tok, small_config(beta=0.0), dataset, funcs, progress=False)
    m0 = t0.train(max_steps=1)[0]
    assert t0.reference is None and "kl" not in m0
    t1 = GRPOTrainer(
        tiny_model(tok), tok, small_config(beta=0.1, mu=2, epsilon_high=0.28), dataset, funcs, progress=False
    )
    m1 = t1.train(max_steps=1)[0]
    assert t1.reference is not None and not any(p.requires_grad for p in t1.reference.parameters())
    expected = {
        "reward/mean",
        "reward/std",
        "reward/accuracy/mean",
        "reward/accuracy/std",
        "reward/think/mean",
        "reward/think/std",
        "accuracy",
        "kl",
        "clip_low",
        "clip_high",
        "completion_length/mean",
        "completion_length/max",
        "truncated_share",
        "entropy",
        "loss",
        "lr",
        "grad_norm",
        "step_time",
        "tokens_per_s",
        "zero_std_groups",
    }
    assert expected <= set(m1), expected - set(m1)
    assert all(math.isfinite(v) for v in m1.values())
    assert m1["kl"] == pytest.approx(sum(t1.last_update_stats["kl"]) / 2)  # KL's values: see the reference test


def test_reference_is_the_policy_at_each_iteration_start(tiny_model, tok, dataset):
    """β > 0: π_ref ← π_θ at the first step of every iteration, and held fixed through the iteration's other steps."""
    def length(prompts, completions, **kw):  # differs within groups: every update moves the policy
        return [len(c) / 10 for c in completions]

    cfg = small_config(beta=0.1, iterations=2, steps_per_iteration=2)
    trainer = GRPOTrainer(tiny_model(tok), tok, cfg, dataset, [("length", length, 1.0)], progress=False)

    def weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    for step in range(4):
        before = weights(trainer.engine.module)
        trainer.train(max_steps=1)
        ref, now = weights(trainer.reference), weights(trainer.engine.module)
        kl = trainer.last_update_stats["kl"][0]
        if step % 2 == 0:  # iteration start: the reference is the policy as the step began, so KL(π_θ‖π_ref) = 0
            start = before
            assert kl == pytest.approx(0.0, abs=1e-7), step
        else:  # mid-iteration: the reference stayed while the policy moved
            assert kl > 1e-6, step
        assert same(ref, start), step
        assert not same(ref, now), step


def test_prompt_sampler_epochs_and_state():
    s = PromptSampler(5, seed=0)
    first = s.take(3) + s.take(2)
    assert sorted(first) == list(range(5))
    nxt = s.take(4)
    state = s.state()
    s2 = PromptSampler(5, seed=0)
    s2.load(state)
    assert s.take(3) == s2.take(3) and len(set(nxt)) == 4


def test_char_offsets_map_to_token_ends(tok):
    text = "<think>12+34=46, write 6.</think><answer>46</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = [tok.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
    offsets = [len("<think>"), len("<think>12+34=46,"), len(text) - len("</answer>"), len(text)]
    ends = char_offsets_to_token_ends(tok, torch.tensor(ids), len(ids), offsets)
    for off, k in zip(offsets, ends):
        assert len(pieces[k]) >= off and (k == 0 or len(pieces[k - 1]) < off)
    assert ends[0] == 0  # "<think>" is one token
    assert ends[-1] == len(ids) - 2  # the last text character is in the token before EOS
    # a multi-byte character split over byte-level tokens maps to the token that completes it
    zh = "所以 答案"
    zids = tok(zh, add_special_tokens=False)["input_ids"]
    k = char_offsets_to_token_ends(tok, torch.tensor(zids), len(zids), [1])[0]
    assert tok.decode(zids[: k + 1]) == "所" and "\ufffd" in tok.decode(zids[:k]) + "\ufffd"


def test_process_mode_trains(tiny_model, tok, dataset):
    def per_step(prompts, completions, **kw):
        # a "step" ends at every ",": reward 1 if the step contains a digit
        out = []
        for c in completions:
            steps, start = [], 0
            for i, ch in enumerate(c):
                if ch == "," or i == len(c) - 1:
                    steps.append((i + 1, float(any(x.isdigit() for x in c[start : i + 1]))))
                    start = i + 1
            out.append(steps)
        return out

    per_step.process = True
    trainer = GRPOTrainer(
        tiny_model(tok),
        tok,
        small_config(advantage_mode="process"),
        dataset,
        [("digit_steps", per_step, 1.0)],
        progress=False,
    )
    seen, update = [], trainer.policy_update

    def spy(rollout, advantages):
        seen.append((rollout.completion_mask.float(), advantages.clone()))
        return update(rollout, advantages)

    trainer.policy_update = spy
    history = trainer.train()
    assert len(history) == len(seen) == 2
    assert any(adv.abs().sum() > 0 for _, adv in seen)  # some steps differ within a group: a signal
    for (mask, adv), m in zip(seen, history, strict=True):
        # μ=1, β=0: ratio 1, so the sequence-mean loss is minus the mean over completions of each one's mean per-token
        # advantage (a token's advantage is the sum of the normalised rewards of the steps ending at or after it)
        assert adv.shape == mask.shape
        expected = -((adv * mask).sum(1) / mask.sum(1).clamp_min(1)).mean().item()
        assert m["loss"] == pytest.approx(expected, abs=1e-5)

    def bad(prompts, completions, **kw):
        return [[(10_000, 1.0)]] * len(completions)

    bad.process = True

    trainer = GRPOTrainer(
        tiny_model(tok), tok, small_config(advantage_mode="process"), dataset, [("bad_steps", bad, 1.0)], progress=False
    )
    with pytest.raises(RewardError, match=r"'bad_steps': step end 10000 is not an offset"):
        trainer.train()


def test_process_advantage_reaches_eos(tiny_model, tok, dataset):
    """The last step covers the EOS (decoded text has none): Â at EOS is the last step's normalised reward, not 0."""
    texts = ["12+34=46. so 46", "12+34=47. so 46"]

    class Fixed:
        def generate(self, prompts, num_generations, sampling, **kw):
            return rollout_from_completions(tok, prompts, texts, num_generations)

    def steps(prompts, completions, **kw):  # step 1 right or wrong, the final step right
        return [[(c.index(".") + 1, float("46." in c)), (len(c), 1.0)] for c in completions]

    steps.process = True
    cfg = small_config(advantage_mode="process", prompts_per_step=1, num_generations=2)
    trainer = GRPOTrainer(tiny_model(tok), tok, cfg, dataset, [("steps", steps, 1.0)], backend=Fixed(), progress=False)
    seen = []
    trainer.policy_update = lambda rollout, adv: seen.append((rollout, adv)) or {}
    trainer.train_step()
    [(rollout, adv)] = seen
    # step rewards of the group R = [1, 1, 0, 1]: mean 0.75, unbiased std 0.5; the final step's r̃ = 0.25 / (0.5 + EPS)
    final, first_wrong = 0.25 / (0.5 + EPS), -0.75 / (0.5 + EPS)
    for i in range(2):
        n = int(rollout.lengths[i])
        assert rollout.completion_ids[i, n - 1] == tok.eos_token_id
        assert adv[i, n - 1].item() == pytest.approx(final, rel=1e-5)  # the EOS
        assert adv[i, 0].item() == pytest.approx((final if i == 0 else first_wrong) + final, rel=1e-5)


def test_loggers(tmp_path):
    assert isinstance(ConsoleLogger(), MetricLogger)
    lines = []
    c = ConsoleLogger(keys=("a",), printer=lines.append)
    c.log_metrics({"a": 1.0, "b": 2.0}, step=3)
    assert lines == ["step 3: a=1"] and c.history == [(3, {"a": 1.0, "b": 2.0})]
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        logger = MLflowLogger()
        logger.log_metrics({"reward/mean": 0.5}, step=1)
        logger.log_metrics({"reward/mean": 0.7}, step=2)
        logger.log_params({"beta": 0.04})
    hist = mlflow.MlflowClient().get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (2, 0.7)]
    assert mlflow.get_run(run.info.run_id).data.params["beta"] == "0.04"
    mlflow.set_tracking_uri(previous)


def test_save_model_reloads_through_auto_classes(tiny_model, tok, dataset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger = ConsoleLogger(printer=lambda s: None)
    trainer = GRPOTrainer(
        tiny_model(tok),
        tok,
        small_config(),
        dataset,
        [("think", think_fraction(tok), 1.0)],
        logger=logger,
        progress=False,
    )
    trainer.train(max_steps=1)
    trainer.save_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for k, v in trainer.engine.module.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    text = "<think>1+2=3</think><answer>3</answer>"
    assert AutoTokenizer.from_pretrained(tmp_path / "model").decode(tok(text)["input_ids"]) == text
