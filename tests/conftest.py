"""Shared fixtures. No hub access: every model and tokenizer is built here."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# A recipe small enough to build in seconds: for plumbing tests, not for quality.
MINI = {
    "base_model.model.hidden_size": 32,
    "base_model.model.num_hidden_layers": 1,
    "base_model.model.num_attention_heads": 2,
    "base_model.model.num_key_value_heads": 1,
    "base_model.model.intermediate_size": 64,
    "base_model.train_problems": 400,
    "base_model.max_steps": 8,
    "base_model.batch_size": 16,
    "eval.num_prompts": 8,
    "eval.samples_per_prompt": 2,
    "eval.max_new_tokens": 24,
}


@pytest.fixture
def mini_recipe(tmp_path):
    from stages.core.recipe import load_recipe

    return load_recipe("tiny", {**MINI, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
                                "output_dir": str(tmp_path / "runs")})


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The real `tiny` preset base model, built once per test session (about 2-3 minutes on 2 cores)."""
    from stages.base_model import build_base_model
    from stages.core.recipe import load_recipe

    recipe = load_recipe("tiny")
    out = tmp_path_factory.mktemp("tiny_base") / "model"
    res = build_base_model(recipe, out, progress=False)
    return recipe, res


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs 10-25 s on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # slow machines
        yield


@pytest.fixture(scope="session")
def tok():
    """The engine tests' tokenizer: byte-level BPE (vocab 320) trained on clean addition traces."""
    from stages.core.tasks import clean_trace, make_problems
    from stages.core.tokenizer import train_tokenizer

    problems = make_problems("addition", 200, seed=0)
    return train_tokenizer([f"User: {p.question}\nAssistant:{clean_trace(p)}" for p in problems], vocab_size=320)


# The engine tests' model: 1 layer, hidden 32, 4 heads (2 KV), 128 positions, tied embeddings. Seconds on a CPU.
TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 128, "tie_word_embeddings": True}


def build_tiny_model(tok=None, seed: int = 0, arch: str = "qwen2", **config):
    """A tiny randomly initialised model after `torch.manual_seed(seed)`: TINY_MODEL with vocabulary, EOS and padding
    from `tok`, then `config` (any Qwen2Config field; `vocab_size` when there is no tokenizer). arch: "qwen2", "llama"
    (same sizes, another architecture) or "qwen2_classifier" (a sequence-classification head, e.g. num_labels=1)."""
    import torch
    import transformers

    config_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2_classifier": ("Qwen2Config", "Qwen2ForSequenceClassification")}[arch]
    torch.manual_seed(seed)
    vocab = {} if tok is None else {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                                    "pad_token_id": tok.pad_token_id}
    config = getattr(transformers, config_cls)(**{**TINY_MODEL, **vocab, **config})
    return getattr(transformers, model_cls)(config)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny-model factory `build_tiny_model(tok, seed=0, arch="qwen2", **config)`, for tests and fixtures."""
    return build_tiny_model


@pytest.fixture(scope="session")
def mini_base(tmp_path_factory) -> str:
    """A mini base model folder (seconds to build): plumbing, not quality. Stages read it; no test writes to it."""
    from stages.base_model import build_base_model
    from stages.core.recipe import load_recipe

    out = tmp_path_factory.mktemp("mini_base") / "model"
    build_base_model(load_recipe("tiny", MINI), out, progress=False)
    return str(out)
