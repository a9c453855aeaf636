"""Base of every config class: strict pydantic models (unknown keys are errors), and the small-model architecture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def expand_path(path: str | Path) -> Path:
    """A user's path with `~` expanded: the one place a path from a recipe or the command line is expanded, so what is
    checked is what is written (not `./~/x`)."""
    return Path(os.path.expanduser(str(path)))


MAX_TOKENS = 1 << 20  # prompt/completion lengths: beyond any model's context
MAX_GENERATIONS = 1024  # completions sampled per prompt (R1 samples 16)
MAX_SEED = 2**32 - 1  # what every RNG takes (torch's manual_seed fails late beyond 64 bits)

UserPath = Annotated[str, AfterValidator(lambda p: os.path.expanduser(p))]  # a recipe path, `~` expanded at load


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored. Strict types: `true` is not 1 and
    "5" is not 5 (YAML already gives real numbers and booleans); numbers must be finite (NaN > 0 is false, so a NaN
    would pass every bound)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelArch(Strict):
    """A small Qwen2-architecture model built from scratch (the `tiny` stand-in for a pretrained base)."""

    hidden_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(384, ge=8)
    max_position_embeddings: int = Field(256, ge=16, le=MAX_TOKENS)
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary size (byte alphabet of 256 + merges + specials)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self
