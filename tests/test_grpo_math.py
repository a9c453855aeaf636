"""Advantages, KL estimators, clipped surrogate and aggregations against hand-computed numbers."""

import math

import pytest
import torch

from grpo.advantages import group_advantages, process_advantages
from grpo.loss import aggregate, clipped_surrogate, grpo_loss, kl_k1, kl_k2, kl_k3


def close(a, b, tol=1e-3):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_group_advantages_outcome():
    # group 1: [1,0,0,0] mean .25, unbiased std .5 -> [1.5,-.5,-.5,-.5]; group 2: [2,4,2,4] mean 3, std 2/sqrt(3)
    r = torch.tensor([1.0, 0, 0, 0, 2, 4, 2, 4])
    adv = group_advantages(r, G=4)
    s = math.sqrt(3) / 2
    assert close(adv, [1.5, -0.5, -0.5, -0.5, -s, s, -s, s])


def test_group_advantages_zero_variance_group_is_zero_not_nan():
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    adv = group_advantages(r, G=3)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3] > 0 and adv[4] < 0


def test_group_advantages_scaling_modes():
    r = torch.tensor([1.0, 0, 3, 3])  # group means .5 and 3
    assert close(group_advantages(r, 2, "none"), [0.5, -0.5, 0, 0])
    batch_std = r.std().item()
    assert close(group_advantages(r, 2, "batch"), [0.5 / batch_std, -0.5 / batch_std, 0, 0])


def test_process_advantages_worked_example():
    # One group, G=2. Completion 0: steps end at tokens 1 and 3 with rewards 1, 0.
    # Completion 1: one step ending at token 2 with reward 0.5.
    # R = [1, 0, .5]: mean .5, std .5 -> r̃ = [1, -1, 0]
    # completion 0 tokens 0,1 (both steps end at/after): 1 + -1 = 0; tokens 2,3: -1; token 4: 0
    # completion 1 tokens 0..2: 0; tokens 3,4: 0
    adv = process_advantages([[1.0, 0.0], [0.5]], [[1, 3], [2]], G=2, completion_len=5)
    assert close(adv, [[0, 0, -1, -1, 0], [0, 0, 0, 0, 0]])
    # a second example with non-zero suffix sums: R = [2, 0, 1, 1] mean 1, std sqrt(2/3)
    adv = process_advantages([[2.0, 0.0], [1.0, 1.0]], [[0, 2], [1, 2]], G=2, completion_len=4)
    s = math.sqrt(2 / 3)
    assert close(adv, [[0, -1 / s, -1 / s, 0], [0, 0, 0, 0]])


def test_process_advantages_zero_variance_and_no_steps():
    adv = process_advantages([[1.0], [1.0, 1.0], [], []], [[0], [0, 2], [], []], G=2, completion_len=3)
    assert adv.abs().sum() == 0 and torch.isfinite(adv).all()


def test_kl_estimators():
    new, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    # ref - new = [-.5, 1]
    assert close(kl_k3(new, ref), [math.exp(-0.5) + 0.5 - 1, math.exp(1) - 1 - 1])
    assert close(kl_k3(new, ref), [0.106531, 0.718282], 1e-5)
    assert close(kl_k1(new, ref), [0.5, -1.0])
    assert close(kl_k2(new, ref), [0.125, 0.5])
    assert kl_k3(new, new).abs().max() == 0


def test_clipped_surrogate_both_sides_asymmetric():
    eps_low, eps_high = 0.2, 0.28
    ratio = torch.tensor([[0.5, 0.5, 1.0, 1.5, 1.5, 1.25]])
    adv = torch.tensor([[-1.0, 1.0, 2.0, 1.0, -1.0, 1.0]])
    old = torch.zeros_like(ratio)
    loss, low, high = clipped_surrogate(ratio.log(), old, adv, eps_low, eps_high)
    # -min(rA, clip(r)A): A<0,r=.5 -> -min(-.5,-.8)=.8 (clipped low); A>0,r=.5 -> -.5 (not clipped: min picks rA)
    # r=1 -> -2; r=1.5,A>0 -> -1.28 (clipped high); r=1.5,A<0 -> 1.5; r=1.25 < 1.28 -> -1.25
    assert close(loss, [[0.8, -0.5, -2.0, -1.28, 1.5, -1.25]], 1e-5)
    assert low.tolist() == [[True, False, False, False, False, False]]
    assert high.tolist() == [[False, False, False, True, False, False]]
    # gradient is cut exactly where the clip is active
    lp = ratio.log().clone().requires_grad_()
    clipped_surrogate(lp, old, adv, eps_low, eps_high)[0].sum().backward()
    assert (lp.grad[0, [0, 3]] == 0).all() and (lp.grad[0, [1, 2, 4, 5]] != 0).all()


def test_outcome_advantage_broadcasts_over_tokens():
    loss, _, _ = clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -2.0]), 0.2, 0.2)
    assert close(loss, [[-1, -1, -1], [2, 2, 2]])


def test_aggregation_modes():
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert close(aggregate(x, m, "sequence_mean"), (2.0 + 4.0) / 2)
    assert close(aggregate(x, m, "token_mean"), 10.0 / 4)
    assert close(aggregate(x, m, "dr_grpo", max_len=8), 10.0 / (2 * 8))
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, m, "dr_grpo")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(x, m, "nope")


def test_grpo_loss_combines_surrogate_and_kl():
    new = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    adv = torch.tensor([1.0])
    m = torch.ones(1, 2)
    loss, stats = grpo_loss(new, new.detach(), adv, m, logp_ref=ref, beta=0.1, aggregation="token_mean")
    expected = (-1 + 0.1 * 0.106531 + -1 + 0.1 * 0.718282) / 2
    assert close(loss, expected, 1e-5)
    assert close(stats["kl"], (0.106531 + 0.718282) / 2, 1e-5)
    assert stats["clip_low"] == 0 and stats["clip_high"] == 0
    loss0, stats0 = grpo_loss(new, new.detach(), adv, m, beta=0.0)
    assert "kl" not in stats0 and close(loss0, -1.0)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(new, new.detach(), adv, m, beta=0.1)


def test_masked_tokens_do_not_affect_loss():
    torch.manual_seed(0)
    new, old, ref = torch.randn(3, 2, 5).unbind(0)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    for mode in ("sequence_mean", "token_mean", "dr_grpo"):
        a, _ = grpo_loss(new, old, adv, m, logp_ref=ref, beta=0.04, aggregation=mode, max_len=5)
        new2 = new.clone()
        new2[0, 3:] = 100.0  # garbage after EOS
        b, _ = grpo_loss(new2, old, adv, m, logp_ref=ref, beta=0.04, aggregation=mode, max_len=5)
        assert torch.equal(a, b)


def test_lr_schedule_warmup_then_cosine():
    from grpo.engine import lr_lambda

    f = lr_lambda(warmup_steps=3, total_updates=13, schedule="cosine")
    assert [round(f(u), 4) for u in range(3)] == [0.25, 0.5, 0.75]
    assert f(3) == 1.0 and abs(f(8) - 0.5) < 1e-9 and f(13) == 0.0
    assert lr_lambda(0, 10, "constant")(7) == 1.0


def _moments(values, call) -> torch.Tensor:
    """The moments a rank holding `values` contributes to batch scaling (what its all-reduce receives)."""
    seen = []
    call(values, lambda t: seen.append(t) or t)
    return seen[0]


def test_batch_scaling_on_two_ranks_equals_one_process_on_the_whole_batch():
    r = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 9.0, 1.0, 0.0, 0.0, 3.0, 4.0, 8.0])  # 4 groups of G=3
    whole = group_advantages(r, 3, "batch")
    centred = r.view(4, 3) - r.view(4, 3).mean(1, keepdim=True)
    assert torch.allclose(whole, (centred / (r.std() + 1e-4)).view(-1), atol=1e-6)  # by hand: one std for all 12

    def outcome(x, all_reduce):
        return group_advantages(x, 3, "batch", all_reduce=all_reduce)

    a, b = r[:6], r[6:]  # rank 0 holds groups 0-1, rank 1 groups 2-3
    ma, mb = _moments(a, outcome), _moments(b, outcome)
    two = torch.cat([outcome(a, lambda t: t + mb), outcome(b, lambda t: t + ma)])  # all-reduce = sum over the 2 ranks
    assert torch.allclose(two, whole, atol=1e-6)
    own = torch.cat([outcome(a, lambda t: t), outcome(b, lambda t: t)])  # each rank its own std: not the same
    assert not torch.allclose(own, whole, atol=1e-2)


def test_process_batch_scaling_on_two_ranks_equals_one_process():
    steps = [[1.0, 0.0], [2.0], [0.0, 0.0, 3.0], [5.0], [1.0, 4.0], [0.0]]  # G=2: ranks hold 2 groups / 1 group
    ends = [[1, 3], [2], [0, 1, 2], [3], [1, 2], [0]]

    def process(idx):
        return lambda x, all_reduce: process_advantages([steps[i] for i in idx], [ends[i] for i in idx], 2, 4, "batch",
                                                        all_reduce=all_reduce)

    whole = process_advantages(steps, ends, 2, 4, "batch")
    r0, r1 = [0, 1, 2, 3], [4, 5]
    m0, m1 = _moments(None, lambda _, ar: process(r0)(None, ar)), _moments(None, lambda _, ar: process(r1)(None, ar))
    two = torch.cat([process(r0)(None, lambda t: t + m1), process(r1)(None, lambda t: t + m0)])
    assert torch.allclose(two, whole, atol=1e-6)
    assert not torch.allclose(torch.cat([process(r0)(None, lambda t: t), process(r1)(None, lambda t: t)]), whole,
                              atol=1e-2)


def test_reward_std_metrics_are_pooled_over_ranks(monkeypatch):
    from grpo import trainer

    a, b = torch.tensor([0.0, 1.0, 1.0, 3.0]), torch.tensor([7.0, 8.0, 8.0, 9.0])

    def rank_metrics(x):
        return {"reward/mean": x.mean().item(), "reward/std": x.std().item(), "reward/r/mean": (2 * x).mean().item(),
                "reward/r/std": (2 * x).std().item(), "zero_std_groups": 0.5}

    # rank 1's moments (n, Σv, Σv²) per std metric, in sorted key order: reward/r/std, reward/std
    other = torch.tensor([[4.0, 4 * m, 3 * s * s + 4 * m * m] for m, s in
                          [((2 * b).mean().item(), (2 * b).std().item()), (b.mean().item(), b.std().item())]],
                         dtype=torch.float64)
    monkeypatch.setattr(trainer, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(trainer, "all_reduce_sum", lambda t: t + other)
    pooled = trainer.pooled_std_metrics(rank_metrics(a), 4)
    both = torch.cat([a, b])
    assert pooled["reward/std"] == pytest.approx(both.std().item(), rel=1e-6)  # 3.74, not (1.26 + 0.82) / 2
    assert pooled["reward/r/std"] == pytest.approx((2 * both).std().item(), rel=1e-6)
    assert pooled["reward/mean"] == rank_metrics(a)["reward/mean"] and pooled["zero_std_groups"] == 0.5
