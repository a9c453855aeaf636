"""Reward functions for GRPO: `fn(prompts, completions, **columns) -> list[float]` (process rewards: a list of
(step end offset, reward) pairs per completion), and a registry that builds them by name from config."""

from rewards.accuracy import accuracy_reward, is_correct, normalize_answer
from rewards.code import code_tests_reward, extract_code
from rewards.format import format_reward, soft_format_reward
from rewards.language import language_consistency_reward, target_language_share
from rewards.length import cosine_length_reward, overlong_reward, repetition_penalty_reward
from rewards.math_verifier import MathVerifier
from rewards.parsing import extract_answer, extract_boxed, extract_think, is_r1_format
from rewards.process import arithmetic_claims, process_arithmetic_reward, process_reward_model, split_steps
from rewards.registry import REGISTRY, RewardSpec, build_rewards


def __getattr__(name):  # the reward-model side imports torch/transformers: only on first use
    if name in ("RewardModelScorer", "train_bradley_terry", "pairwise_accuracy"):
        from rewards import reward_model  # lazy: imports torch/transformers

        return getattr(reward_model, name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")


__all__ = [
    "REGISTRY",
    "MathVerifier",
    "RewardModelScorer",
    "RewardSpec",
    "accuracy_reward",
    "arithmetic_claims",
    "build_rewards",
    "code_tests_reward",
    "cosine_length_reward",
    "extract_answer",
    "extract_boxed",
    "extract_code",
    "extract_think",
    "format_reward",
    "is_correct",
    "is_r1_format",
    "language_consistency_reward",
    "normalize_answer",
    "overlong_reward",
    "pairwise_accuracy",
    "process_arithmetic_reward",
    "process_reward_model",
    "repetition_penalty_reward",
    "soft_format_reward",
    "split_steps",
    "target_language_share",
    "train_bradley_terry",
]
