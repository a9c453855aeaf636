"""rewards.language: share of target-language words in the think block, counted by script, lingua for shared scripts."""

import random
import time

import pytest

from rewards.language import language_consistency_reward, target_language_share, words_by_script
from stages.core.tasks import TraceNoise, make_problems, noisy_trace


def T(think: str) -> str:
    return f"<think>{think}</think><answer>85</answer>"


EN = "7+8=15, write 5 carry 1. 3+4+1=8, write 8. so the answer is 85."
# the noisy-trace style: Chinese words swapped in for English ones
MIXED = "7+8=15, 写 5 进位 1. 3+4+1=8, write 8. 所以 答案 是 85."


def test_pure_english_is_one():
    assert language_consistency_reward([""], [T(EN)]) == [1.0]


def test_mixed_exact_word_share():
    # Latin words: write (1). Han characters, one word each: 写 进 位 所 以 答 案 是 (8). Numbers are neutral.
    assert [w for _, w, s in words_by_script(MIXED) if s == "Latin"] == ["write"]
    (r,) = language_consistency_reward([""], [T(MIXED)])
    assert r == pytest.approx(1 / 9)
    assert 0 < r < 1
    (r2,) = language_consistency_reward([""], [T("7+8=15, write 5 进位 1. so the answer is 85.")])
    assert r2 == pytest.approx(5 / 7)  # write so the answer is | 进 位


def test_target_zh():
    assert language_consistency_reward([""], [T(MIXED)], target_language="zh") == [pytest.approx(8 / 9)]
    assert language_consistency_reward([""], [T("所以答案是八十五")], target_language="zh") == [1.0]
    assert language_consistency_reward([""], [T(EN)], target_language="zh") == [0.0]


def test_empty_missing_and_wordless_think_is_zero():
    comps = [T(""), T("   "), "no think block at all", T("7+8=15. 15+1=16.")]
    assert language_consistency_reward([""] * 4, comps) == [0.0, 0.0, 0.0, 0.0]


def test_unknown_code_names_it():
    with pytest.raises(ValueError, match="'xx'"):
        language_consistency_reward([""], [T(EN)], target_language="xx")
    with pytest.raises(ValueError, match="'english'"):
        language_consistency_reward([""], [T(EN)], languages=["en", "english"])


def test_shared_script_uses_lingua_per_sentence():
    text = "The cat sleeps on the table today. Le chat dort sur la table aujourd'hui."
    # English sentence 7 words; French sentence 7 words (aujourd'hui is one word)
    assert target_language_share(text, "en", ["en", "fr"]) == pytest.approx(7 / 14)
    assert target_language_share(text, "fr", ["en", "fr"]) == pytest.approx(7 / 14)
    # with only one Latin-script candidate, every Latin word counts as the target and lingua is not asked
    assert target_language_share(text, "en") == 1.0


def test_other_scripts_and_non_ascii():
    assert target_language_share("Привет мир hello", "ru") == pytest.approx(2 / 3)
    assert target_language_share("naïve café — ½ ✓ 🙂", "en") == 1.0
    assert target_language_share("こんにちは世界", "ja") == 1.0


def test_noisy_traces_and_speed():
    rng = random.Random(0)
    comps = [noisy_trace(p, rng, TraceNoise(mixed_language=0.5)) for p in make_problems("addition", 512, seed=0)]
    t = time.process_time()
    out = language_consistency_reward([""] * len(comps), comps)
    out.extend(language_consistency_reward([""], [T("word " * 200_000)]))  # 1 MB think
    assert time.process_time() - t < 1.0
    assert all(0.0 <= r <= 1.0 for r in out)
    assert 0 < sum(r < 1 for r in out) < len(out)  # some mixed, some clean


def test_nested_tags_are_not_words():
    assert language_consistency_reward(
        [""], ["<think>写<think>字</think><answer>1</answer>"], target_language="zh"
    ) == [1.0]
