"""GRPOConfig: defaults validate; bad values fail naming the field and the value."""

import pytest
import torch
from pydantic import ValidationError

from grpo.config import GRPOConfig


def test_defaults_and_derived():
    c = GRPOConfig()
    assert c.kl_estimator == "k3" and c.eps_low == c.eps_high == 0.2
    c = GRPOConfig(epsilon=0.2, epsilon_high=0.28, iterations=2, steps_per_iteration=3)
    assert (c.eps_low, c.eps_high, c.total_steps) == (0.2, 0.28, 6)


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"mu": 0}, "mu", "0"),
        ({"epsilon": 0.0}, "epsilon", "0.0"),
        ({"epsilon_high": -0.1}, "epsilon_high", "-0.1"),
        ({"beta": -0.01}, "beta", "-0.01"),
        ({"num_generations": 1}, "num_generations", "1"),
        ({"kl_estimator": "k4"}, "kl_estimator", "k4"),
        ({"loss_aggregation": "sum"}, "loss_aggregation", "sum"),
        ({"prompts_per_step": 0}, "prompts_per_step", "0"),
        ({"minibatch_size": 5, "prompts_per_step": 2, "num_generations": 4}, "minibatch_size", "5"),
        ({"learning_rte": 1e-3}, "learning_rte", "0.001"),
    ],
)
def test_bad_values_name_the_field(kwargs, field, value):
    with pytest.raises(ValidationError) as e:
        GRPOConfig(**kwargs)
    assert field in str(e.value) and value in str(e.value)


def test_single_generation_allowed_without_std_scaling():
    assert GRPOConfig(num_generations=1, scale_rewards="none").num_generations == 1


def test_top_p_below_one_warns_once_that_sampling_is_off_policy(caplog, monkeypatch):
    import grpo.config

    monkeypatch.setattr(grpo.config, "_warned_top_p", False)
    with caplog.at_level("WARNING", logger="grpo.config"):
        GRPOConfig(top_p=1.0)
        assert not caplog.records
        GRPOConfig(top_p=0.9)
        GRPOConfig(top_p=0.8)
    (record,) = caplog.records
    assert "top_p=0.9" in record.getMessage() and "not truncated" in record.getMessage()
    assert "off-policy" in GRPOConfig.model_fields["top_p"].description


def test_world_problems_refuse_shares_that_do_not_split_per_rank():
    # B=2, G=3, minibatch 3 on 2 ranks: 1.5 completions per rank and minibatch (3 updates ran where 2 were planned)
    assert GRPOConfig(prompts_per_step=2, num_generations=3, minibatch_size=3).world_problems(2) == [
        "minibatch_size: 3 is not divisible by the 2 processes; every rank takes an equal share of each minibatch"
    ]
    # B=4, G=2, minibatch 2 on 4 ranks: half a completion per rank (a zero-size local minibatch)
    assert [p.split(":")[0] for p in GRPOConfig(prompts_per_step=4, num_generations=2, minibatch_size=2)
            .world_problems(4)] == ["minibatch_size"]
    assert [p.split(":")[0] for p in GRPOConfig(prompts_per_step=3, num_generations=2, minibatch_size=3)
            .world_problems(2)] == ["prompts_per_step", "minibatch_size"]
    for B, G, mb, world in [(4, 2, 4, 2), (4, 2, 2, 2), (4, 2, None, 4), (2, 3, 3, 1)]:
        cfg = GRPOConfig(prompts_per_step=B, num_generations=G, minibatch_size=mb)
        assert cfg.world_problems(world) == []
        # what splits evenly also runs the planned updates: every rank's minibatches cover its completions exactly
        local, planned = B * G // world, B * G // (mb or B * G)
        assert local % planned == 0 and local // planned == (mb or B * G) // world >= 1


def test_trainer_and_preflight_refuse_a_minibatch_that_does_not_split(tok, monkeypatch):
    from grpo.trainer import GRPOTrainer
    from stages.core.preflight import check_cluster
    from stages.core.recipe import load_recipe

    cfg = GRPOConfig(prompts_per_step=2, num_generations=3, minibatch_size=3)
    monkeypatch.setattr("grpo.trainer.rank_and_world", lambda: (0, 2))
    with pytest.raises(ValueError, match=r"^minibatch_size: 3 is not divisible by the 2 processes"):
        GRPOTrainer(torch.nn.Linear(1, 1), tok, cfg, [{"prompt": "1+1"}], [("r", lambda p, c, **k: [0.0] * len(c), 1)])

    recipe = load_recipe("tiny", {"cluster.launcher": "torchrun", "cluster.nproc_per_node": 4,
                                  "r1_zero.grpo.prompts_per_step": 4, "r1_zero.grpo.num_generations": 2,
                                  "r1_zero.grpo.minibatch_size": 2})
    assert check_cluster(recipe, ["r1_zero"]) == [
        ("r1_zero.grpo.minibatch_size: 2 is not divisible by the 4 processes of cluster (1 node(s)); every rank takes "
         "an equal share of each minibatch")
    ]
