"""GRPOConfig: defaults validate; bad values fail naming the field and the value."""

import pytest
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
