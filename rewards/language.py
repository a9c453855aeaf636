"""Language consistency (R1's remedy for language mixing): the share of the CoT's words written in the target language.

R1 defines the reward as "the proportion of target-language words in the CoT". Taken literally it gives 1.0 to a
one-word CoT and nothing to a purely symbolic one (`12+35=47`), so added to the format reward it pays for degenerate
short reasoning. The policy here keeps R1's share wherever there is enough text to measure it:

- no think block, or a blank one: 0.0 (there is no CoT to be consistent; the format reward judges the template);
- numbers and symbols are neutral: they are not words, so they count neither for nor against the target language;
- a CoT with fewer than `min_words` words is topped up with `min_words - n` neutral pseudo-words worth `neutral` each:
  reward = (target words + neutral * (min_words - n)) / min_words. A CoT without words scores `neutral` ("no
  evidence"), a one-word English CoT (1 + 0.5 * 4) / 5 = 0.6 with the defaults (min_words 5, neutral 0.5), and a
  CoT of `min_words` words or more scores exactly R1's share. The tiny task's clean traces have at least five words
  (`3+4=7, write 7. so the answer is 7.`), so they keep 1.0.

Words are counted by Unicode script first: lingua, given a few Chinese words inside an English sentence, calls the whole
sentence English, while the script of each word is unambiguous. A word is a run of letters of one script; numbers and
symbols are neutral and not counted. Han and kana characters count one word each (the usual word-count convention for
CJK text, which writes no spaces), so `进位` is two words and `carry` one.

Only when several candidate languages share a script (English and French are both Latin) is lingua asked which words of
that script are in the target language, one sentence at a time (it splits sentence-level mixing well, word-level
mixing badly). The candidates are `languages` (default: the target plus English and Chinese,
the mix R1 saw); with one candidate per script lingua is never loaded. A sentence lingua cannot decide counts as
target.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Iterable

from rewards.parsing import TAGS, extract_think

# ISO 639-1 code -> the scripts its words are written in (each also a lingua language with that code).
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{
        code: frozenset({"Latin"})
        for code in [
            "en",
            "fr",
            "de",
            "es",
            "it",
            "pt",
            "nl",
            "sv",
            "da",
            "nb",
            "nn",
            "pl",
            "cs",
            "sk",
            "sl",
            "hr",
            "bs",
            "sq",
            "ro",
            "hu",
            "fi",
            "et",
            "lv",
            "lt",
            "tr",
            "az",
            "vi",
            "id",
            "ms",
            "tl",
            "sw",
            "yo",
            "zu",
            "xh",
            "so",
            "st",
            "tn",
            "ts",
            "ga",
            "cy",
            "eu",
            "ca",
            "is",
            "af",
            "eo",
            "la",
            "lg",
            "sn",
        ]
    },
    "zh": frozenset({"Han"}),
    "ja": frozenset({"Han", "Kana"}),
    "ko": frozenset({"Hangul"}),
    **{code: frozenset({"Cyrillic"}) for code in ("ru", "uk", "be", "bg", "mk", "sr", "kk", "mn")},
    "el": frozenset({"Greek"}),
    **{code: frozenset({"Arabic"}) for code in ("ar", "fa", "ur")},
    "he": frozenset({"Hebrew"}),
    **{code: frozenset({"Devanagari"}) for code in ("hi", "mr")},
    "th": frozenset({"Thai"}),
    "hy": frozenset({"Armenian"}),
    "ka": frozenset({"Georgian"}),
}

_CJK_CHAR = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# one CJK character, or a run of other letters (apostrophes inside a word allowed); no nested quantifiers
_WORD = re.compile(rf"[{_CJK_CHAR}]|[^\W\d_{_CJK_CHAR}]+(?:['’][^\W\d_{_CJK_CHAR}]+)*")

_RANGES = [  # (first, last, script) for the first character of a word
    (0x0041, 0x024F, "Latin"),
    (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"),
    (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"),
    (0x0600, 0x077F, "Arabic"),
    (0x0900, 0x097F, "Devanagari"),
    (0x0E00, 0x0E7F, "Thai"),
    (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"),
    (0x1E00, 0x1EFF, "Latin"),
    (0x1F00, 0x1FFF, "Greek"),
    (0x3040, 0x30FF, "Kana"),
    (0x3130, 0x318F, "Hangul"),
    (0x31F0, 0x31FF, "Kana"),
    (0x3400, 0x4DBF, "Han"),
    (0x4E00, 0x9FFF, "Han"),
    (0xAC00, 0xD7AF, "Hangul"),
    (0xF900, 0xFAFF, "Han"),
    (0xFF21, 0xFF5A, "Latin"),
    (0x20000, 0x2FA1F, "Han"),
]


def script_of(ch: str) -> str:
    cp = ord(ch)
    for lo, hi, name in _RANGES:
        if lo <= cp <= hi:
            return name
    return "Other"


def words_by_script(text: str) -> list[tuple[int, str, str]]:
    """(start offset, word, script) for every word of `text`."""
    return [(m.start(), m.group(), script_of(m.group()[0])) for m in _WORD.finditer(text)]


def check_language(code: str) -> str:
    code = str(code).lower()
    if code not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language code {code!r}; known ISO 639-1 codes: {sorted(LANGUAGE_SCRIPTS)}")
    return code


_DETECTORS: dict[frozenset[str], object] = {}
_DETECTORS_LOCK = threading.Lock()


def _detector(codes: frozenset[str]):
    """A lingua detector for exactly these languages, built once (lingua loads its models lazily on first use)."""
    with _DETECTORS_LOCK:
        if codes not in _DETECTORS:
            from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

            langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in sorted(codes)]
            _DETECTORS[codes] = LanguageDetectorBuilder.from_languages(*langs).build()
        return _DETECTORS[codes]


_SENTENCE_END = re.compile(r"[.!?;:。！？；：\n]")


def target_language_share(text: str, target: str = "en", languages: Iterable[str] | None = None) -> float:
    """Share of the words of `text` in language `target` (0.0 when `text` has no words)."""
    hits, words = target_language_counts(text, target, languages)
    return hits / words if words else 0.0


def target_language_counts(text: str, target: str = "en", languages: Iterable[str] | None = None) -> tuple[int, int]:
    """(words of `text` in language `target`, all words of `text`)."""
    target = check_language(target)
    candidates = {target, "en", "zh"} if languages is None else {check_language(c) for c in languages} | {target}
    words = words_by_script(text)
    if not words:
        return 0, 0
    scripts = LANGUAGE_SCRIPTS[target]
    mine = [(off, w, s) for off, w, s in words if s in scripts]
    sharing = {s: frozenset(c for c in candidates if s in LANGUAGE_SCRIPTS[c]) for s in scripts}
    if all(len(sharing[s]) == 1 for s in scripts):  # the script alone decides: lingua not needed
        return len(mine), len(words)
    # lingua, one sentence at a time (it is reliable on a sentence, not on a lone word), for the shared scripts only
    ends = [m.start() for m in _SENTENCE_END.finditer(text)]
    sentences: dict[int, list[tuple[int, str, str]]] = {}
    for word in mine:
        sentences.setdefault(bisect.bisect_left(ends, word[0]), []).append(word)
    hits = 0
    for ws in sentences.values():
        shared = [s for _, _, s in ws if len(sharing[s]) > 1]
        hits += len(ws) - len(shared)
        if shared:
            among = frozenset().union(*(sharing[s] for s in set(shared)))
            lang = _detector(among).detect_language_of(text[ws[0][0] : ws[-1][0] + len(ws[-1][1])])
            if lang is None or lang.iso_code_639_1.name.lower() == target:
                hits += len(shared)
    return hits, len(words)


def language_consistency_reward(
    prompts: list[str],
    completions: list[str],
    target_language: str = "en",
    languages: list[str] | None = None,
    min_words: int = 5,
    neutral: float = 0.5,
    **kwargs,
) -> list[float]:
    """Consistency (0..1) of the think block with `target_language` (ISO 639-1), by the module's policy: R1's share of
    target-language words, shrunk toward `neutral` below `min_words` words; no or blank think block -> 0.0."""
    target = check_language(target_language)
    if languages is not None:
        languages = [check_language(c) for c in languages]
    if min_words < 0:
        raise ValueError(f"min_words must be >= 0 (got {min_words})")
    if not 0.0 <= neutral <= 1.0:
        raise ValueError(f"neutral must be in [0, 1] (got {neutral})")
    return [consistency(extract_think(c), target, languages, min_words, neutral) for c in completions]


def consistency(think: str | None, target: str, languages: list[str] | None, min_words: int, neutral: float) -> float:
    """The policy for one think block (None: there is none)."""
    if think is None:
        return 0.0
    for tag in TAGS:  # a stray nested tag is markup, not English words
        think = think.replace(tag, " ")
    if not think.strip():
        return 0.0
    hits, words = target_language_counts(think, target, languages)
    padding = max(min_words - words, 0)
    if words + padding == 0:  # min_words 0 and no words
        return neutral
    return (hits + neutral * padding) / (words + padding)
