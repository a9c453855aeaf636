"""Security defaults: no model code runs unless the recipe says so, weights load from safetensors only, the servers
this project starts listen on 127.0.0.1 only."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_trust_remote_code_is_off_in_every_preset(preset):
    from stages.core.recipe import load_recipe

    assert load_recipe(preset).base_model.trust_remote_code is False


def test_models_load_from_safetensors_without_remote_code_unless_asked(monkeypatch):
    import transformers

    from stages.core import models

    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: calls.append(kw) or pytest.skip("captured"))
    with pytest.raises(pytest.skip.Exception):
        models.load_model("/some/dir")
    assert calls[0]["use_safetensors"] is True and calls[0]["trust_remote_code"] is False


def test_servers_bind_loopback_only():
    compose = (ROOT / "infra" / "compose.yaml").read_text()
    published = re.findall(r'^\s*-\s*"([^"]+:\d+)"\s*$', compose, re.MULTILINE)
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    from flows.servers import local_servers

    assert inspect.signature(local_servers).parameters["host"].default == "127.0.0.1"
