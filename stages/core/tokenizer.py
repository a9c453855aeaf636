"""A small byte-level BPE tokenizer, built locally, that survives a reload through `AutoTokenizer`.

transformers 5 picks the tokenizer class from the model's `model_type`; a saved Qwen2 model gets `Qwen2Tokenizer`, which
rebuilds its pipeline from vocab + merges with Qwen2's own pre-tokenizer and byte-level decoder. We train with exactly that
pipeline, so the reloaded tokenizer is the one we trained (a custom pre-tokenizer would be silently replaced). Qwen2's
pattern splits digits one by one, which is what a tiny model needs to learn column arithmetic.

`<think>` and friends are ordinary added tokens, not special ones: `skip_special_tokens=True` must keep them.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2's pre-tokenisation regex (as in its tokenizer.json): letters, single digits, punctuation runs, whitespace.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Role-prefixed turns; a generation prompt ends with "Assistant:" as in the R1 template.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train BPE on `texts`; returns a transformers fast tokenizer with eos/pad, tags and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, PAD],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    hf.add_tokens(TAGS)  # normal (non-special) added tokens
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"  # generation pads on the left
    return hf
