"""Does the completion follow the R1 template `<think>...</think><answer>...</answer>`?"""

from __future__ import annotations

from rewards.parsing import TAGS, is_r1_format, ordered_tag_count


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 for exactly one think block then one answer block with only whitespace around (`is_r1_format`), else 0.0."""
    return [1.0 if is_r1_format(c) else 0.0 for c in completions]


def soft_format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Partial credit: 0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` found in that order.

    The score is the longest in-order run of the four tags divided by four, so a completion missing only `</answer>`
    (cut off) gets 0.75, tags in the wrong order earn only the in-order part, and repeating a tag earns nothing extra.
    A strict R1 completion always scores 1.0 here; text around the tags is not checked (that is `format_reward`'s job).
    """
    return [ordered_tag_count(c) / len(TAGS) for c in completions]
