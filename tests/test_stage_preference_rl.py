"""preference_rl: rewards routed by prompt kind, the mix of prompts, reward models trained and logged, a full run."""

import mlflow
import pytest

from stages import preference_rl
from stages.preference_rl import GENERAL, REASONING, mix_counts, routed

SMALL = {
    "preference_rl.grpo.steps_per_iteration": 2,
    "preference_rl.grpo.prompts_per_step": 4,
    "preference_rl.grpo.num_generations": 2,
    "preference_rl.grpo.max_completion_length": 16,
    "preference_rl.data.num_prompts": 20,
    "preference_rl.general_data.num_prompts": 20,
    "preference_rl.general_share": 0.5,
    "preference_rl.reward_model_training.pairs": 96,
    "preference_rl.reward_model_training.eval_pairs": 32,
    "preference_rl.reward_model_training.learning_rate": 3e-3,
    "preference_rl.general_eval_prompts": 4,
}


def _recipe(mini_recipe, **overrides):
    from stages.core.recipe import Recipe, _set_dotted

    data = mini_recipe.model_dump()
    for k, v in {**SMALL, **overrides}.items():
        _set_dotted(data, k, v)
    return Recipe.model_validate(data)


def test_rule_rewards_score_only_reasoning_rows_and_reward_models_only_general_rows():
    from rewards import accuracy_reward, format_reward

    prompts = ["User: 2+2\nAssistant:", "User: Greet Bob.\nAssistant:", "User: 3+4\nAssistant:",
               "User: Repeat: cat dog\nAssistant:"]
    good = "<think>2+2=4.</think><answer>4</answer>"
    completions = [good, "<think>x</think><answer>Hello, Bob!</answer>", "<think>3+4=7.</think><answer>7</answer>",
                   "<think>2+2=4.</think><answer>4</answer>"]  # a perfect-looking reasoning reply on a general prompt
    columns = {"answer": ["4", "Hello, Bob!", "7", "4"], "kind": [REASONING, GENERAL, REASONING, GENERAL],
               "task": ["addition", "general:greet", "addition", "general:repeat"], "metadata": ["{}"] * 4}
    assert routed(accuracy_reward, REASONING)(prompts, completions, **columns) == [1.0, 0.0, 1.0, 0.0]
    assert routed(format_reward, REASONING)(prompts, completions, **columns) == [1.0, 0.0, 1.0, 0.0]

    seen = []

    def reward_model(p, c, **cols):  # records what it was shown: only the general rows, columns aligned
        seen.append((p, c, cols["answer"]))
        return [10.0 + i for i in range(len(c))]

    assert routed(reward_model, GENERAL)(prompts, completions, **columns) == [0.0, 10.0, 0.0, 11.0]
    assert seen == [([prompts[1], prompts[3]], [completions[1], completions[3]], ["Hello, Bob!", "4"])]
    # a batch with no row of the kind never calls the function
    assert routed(reward_model, GENERAL)(prompts[:1], completions[:1], answer=["4"], kind=[REASONING]) == [0.0]
    assert len(seen) == 1
    with pytest.raises(ValueError, match="'kind' column"):
        routed(reward_model, GENERAL)(prompts, completions, answer=columns["answer"])


def test_group_statistics_stay_per_prompt():
    """A general prompt's group gets no rule-reward signal, a reasoning prompt's no reward-model signal."""
    import torch

    from grpo.advantages import group_advantages

    G = 2
    kinds = [REASONING] * G + [GENERAL] * G
    completions = ["<answer>4</answer>", "<answer>5</answer>", "Hello, Bob!", "I do not know."]
    cols = {"answer": ["4", "4", "Hello, Bob!", "Hello, Bob!"], "kind": kinds}
    from rewards import accuracy_reward

    rule = routed(accuracy_reward, REASONING)([""] * 4, completions, **cols)
    rm = routed(lambda p, c, **k: [2.0 if x.startswith("Hello") else -1.0 for x in c], GENERAL)([""] * 4,
                                                                                                completions, **cols)
    adv = group_advantages(torch.tensor([a + b for a, b in zip(rule, rm)]), G, "group")
    assert rule == [1.0, 0.0, 0.0, 0.0] and rm == [0.0, 0.0, 2.0, -1.0]
    assert adv[0] > 0 > adv[1] and adv[2] > 0 > adv[3]


def test_mix_counts_keep_the_share():
    assert mix_counts(2000, 400, 0.25) == (1200, 400)
    assert mix_counts(300, 400, 0.25) == (300, 100)
    assert mix_counts(300, 400, 0.0) == (300, 0)
    assert mix_counts(300, 400, 1.0) == (0, 400)


def test_rows_are_tagged_and_mixed(mini_recipe):
    recipe = _recipe(mini_recipe, **{"preference_rl.general_share": 0.25})
    rows = preference_rl.mixed_rows(recipe, recipe.preference_rl)
    kinds = [r["kind"] for r in rows]
    assert kinds.count(GENERAL) == 7 and kinds.count(REASONING) == 20  # round(20 * .25 / .75) = 7
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert all(r["task"].startswith("general") == (r["kind"] == GENERAL) for r in rows)


def test_each_reward_model_learns_from_the_view_it_is_scored_on(mini_recipe, tok, tmp_path, monkeypatch):
    """Helpfulness reads the final answer, harmlessness the whole response, in training and in RL alike: the pairs are
    whole completions like the policy's (plain, or a thought then the answer) and the view is recorded with the model.
    (Harmlessness was trained on bare answers and scored on whole completions.)"""
    from rewards import reward_model
    from rewards.reward_model import RewardModelScorer

    recipe = _recipe(mini_recipe, **{"preference_rl.reward_model_training.pairs": 16,
                                     "preference_rl.reward_model_training.epochs": 1})
    seen = []
    real = reward_model._scores
    monkeypatch.setattr(reward_model, "_scores", lambda m, t, texts, *a: seen.extend(texts) or real(m, t, texts, *a))
    for which, (mode, _) in preference_rl.REWARD_MODELS.items():
        pairs = preference_rl.preference_pairs(recipe, recipe.preference_rl, which, "train", 16)
        assert {c.startswith("<think>") for _, c, _ in pairs} == {True, False}  # both forms the policy writes
        seen.clear()
        path = preference_rl.train_reward_model(recipe, recipe.preference_rl, tok, which, tmp_path / which)
        learnt = set(seen)
        seen.clear()
        scorer = RewardModelScorer(path)
        assert scorer.mode == mode
        scorer([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs])
        assert set(seen) == learnt  # it scores a completion as the very text it learnt from
        assert any("<think>" in t for t in learnt) == (mode == "full")
    with pytest.raises(ValueError, match="trained on the 'full' view"):
        RewardModelScorer(tmp_path / "harmlessness", mode="answer")


def test_a_given_reward_model_trained_on_another_view_is_refused_before_any_model_loads(mini_recipe, tok, tmp_path):
    from stages.core.models import ModelInputError

    recipe = _recipe(mini_recipe, **{"preference_rl.reward_model_training.pairs": 8,
                                     "preference_rl.reward_model_training.epochs": 1})
    full = preference_rl.train_reward_model(recipe, recipe.preference_rl, tok, "harmlessness", tmp_path / "rm")
    recipe = _recipe(mini_recipe, **{"preference_rl.helpfulness_model": str(full)})
    with pytest.raises(ModelInputError, match=r"preference_rl.helpfulness_model: .* trained on the 'full' view.*"
                                              r"helpfulness scores the 'answer' view"):
        preference_rl.run(recipe, inputs={"model": str(tmp_path / "not-loaded")}, progress=False)


def test_bad_reward_model_path_fails_before_any_model_loads(mini_recipe, tmp_path):
    from stages.core.models import ModelInputError

    recipe = _recipe(mini_recipe, **{"preference_rl.helpfulness_model": str(tmp_path / "nope")})
    with pytest.raises(ModelInputError, match="preference_rl.helpfulness_model"):
        preference_rl.run(recipe, inputs={"model": str(tmp_path / "also-not-loaded")}, progress=False)


def test_process_advantages_are_refused_in_the_config():
    from pydantic import ValidationError

    from stages.core.configs import PreferenceRLConfig

    with pytest.raises(ValidationError, match="advantage_mode"):
        PreferenceRLConfig.model_validate({"grpo": {"advantage_mode": "process"}})


def test_preference_rl_end_to_end_trains_and_logs_reward_models(mini_recipe, tmp_path):
    from stages.base_model import build_base_model
    from stages.core.models import check_model_dir, resolve_model_uri

    recipe = _recipe(mini_recipe)
    base = build_base_model(recipe, tmp_path / "policy", progress=False).path
    out = preference_rl.run(recipe, inputs={"model": str(base)}, progress=False)

    run = mlflow.get_run(out["run_id"])
    m = run.data.metrics
    assert run.data.tags["r1.stage"] == "preference_rl" and out["model"] == f"runs:/{out['run_id']}/model"
    for which in ("helpfulness", "harmlessness"):
        assert m[f"reward_model/{which}/pairwise_accuracy"] > 0.5  # above chance on held-out pairs
        assert f"general/{which}_before" in m and f"general/{which}_after" in m
        assert f"reward/{which}/mean" in m
        path = resolve_model_uri(f"runs:/{out['run_id']}/reward_models/{which}")
        assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    assert m["reward_model/harmlessness/pairwise_accuracy"] >= 0.9  # rude replies are easy to tell apart
    for k in ("eval/pass_at_1", "eval/format_rate", "reward/accuracy/mean", "reward/format/mean"):
        assert k in m
    check_model_dir(resolve_model_uri(out["model"]))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])}
    assert {"model", "reward_models", "samples.json", "general_samples.json"} <= artifacts
