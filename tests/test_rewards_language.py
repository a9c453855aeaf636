"""rewards.language: share of target-language words in the think block, counted by script, lingua for shared scripts;
the policy for short, symbolic and missing CoTs."""

import random
import time

import pytest

from rewards.language import language_consistency_reward, target_language_share, words_by_script
from stages.core.tasks import TraceNoise, clean_trace, make_problems, noisy_trace


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


def test_no_cot_is_zero():
    comps = [T(""), T("   "), "no think block at all", "7+8=15, write 5 carry 1. so the answer is 15."]
    assert language_consistency_reward([""] * 4, comps) == [0.0, 0.0, 0.0, 0.0]


def test_short_and_symbolic_cots_are_shrunk_toward_neutral():
    """Below min_words (5) the CoT is topped up with neutral pseudo-words worth 0.5: (target + 0.5 * (5 - n)) / 5."""
    comps = [
        T("12+35=47"),  # no words: no evidence either way -> 0.5
        T("ok"),  # (1 + 0.5 * 4) / 5
        T("12+35=47, so 47."),  # numbers neutral: one word, as "ok"
        T("好"),  # one word, not the target: (0 + 0.5 * 4) / 5
        T("write 5 进位"),  # write | 进 位: (1 + 0.5 * 2) / 5
        T("3+4=7, write 7. so the answer is 7."),  # the tiny task's shortest clean trace: 5 words, R1's share
    ]
    assert language_consistency_reward([""] * 6, comps) == pytest.approx([0.5, 0.6, 0.6, 0.4, 0.4, 1.0])
    # a degenerate CoT scores below a real one, a wrong-language one below one with no words at all
    assert language_consistency_reward([""], [T("ok")]) < language_consistency_reward([""], [T(EN)])


def test_min_words_and_neutral_are_keywords_the_registry_binds():
    from rewards.registry import build_rewards

    ((_, fn, _),) = build_rewards([{"name": "language_consistency", "params": {"min_words": 10, "neutral": 0.0}}])
    # EN: 7 English words (write carry write so the answer is), topped up with 3 worth 0: 7 / 10; no words: 0.0
    assert fn([""] * 2, [T(EN), T("12+35=47")]) == pytest.approx([0.7, 0.0])
    ((_, r1, _),) = build_rewards([{"name": "language_consistency", "params": {"min_words": 0}}])
    assert r1([""] * 3, [T("ok"), T("12+35=47"), T(MIXED)]) == pytest.approx([1.0, 0.5, 1 / 9])  # R1's literal share
    with pytest.raises(ValueError, match="language_consistency.*min_words"):
        build_rewards([{"name": "language_consistency", "params": {"min_words": -1}}])
    with pytest.raises(ValueError, match="language_consistency.*neutral.*1.5"):
        build_rewards([{"name": "language_consistency", "params": {"neutral": 1.5}}])


def test_the_tiny_tasks_traces_score_as_r1s_share():
    """Clean and noisy tiny traces all have at least min_words words: the policy leaves their reward as R1 defines it."""
    rng = random.Random(0)
    problems = make_problems("addition", 300, seed=0)
    comps = [noisy_trace(p, rng, TraceNoise(mixed_language=0.5)) for p in problems]
    shrunk = language_consistency_reward([""] * len(comps), comps)
    literal = language_consistency_reward([""] * len(comps), comps, min_words=0)
    assert shrunk == literal
    assert language_consistency_reward([""], [clean_trace(problems[0])]) == [1.0]


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
        [""], ["<think>写<think>字</think><answer>1</answer>"], target_language="zh", min_words=2
    ) == [1.0]
