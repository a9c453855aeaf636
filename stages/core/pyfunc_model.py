"""A stage's model as an MLflow pyfunc: a string column `prompt` in, `completion` out (sampled, or greedy at
temperature 0).

This file is copied into each logged model's `code/` folder and imported there by its bare name (MLflow's
`loader_module`), so it must stand alone: no import from this repository. `_load_pyfunc` gets the model folder itself,
which is the Hugging Face `save_pretrained` directory (safetensors) the later stages read.
"""

from __future__ import annotations

LOADER_MODULE = "pyfunc_model"
PARAMS = {"max_new_tokens": 64, "temperature": 0.0}


class TextGenerator:
    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # generation continues each prompt at its end
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32).eval()

    def predict(self, data, params: dict | None = None):
        import pandas as pd
        import torch

        p = {**PARAMS, **(params or {})}
        prompts = [str(x) for x in (data["prompt"] if hasattr(data, "columns") else data)]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        sample = float(p["temperature"]) > 0
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=int(p["max_new_tokens"]), do_sample=sample,
                                      temperature=float(p["temperature"]) if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        completions = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return pd.DataFrame({"completion": completions})


def _load_pyfunc(path: str) -> TextGenerator:
    return TextGenerator(path)
