"""A learned reward: a sequence-classification model with one output (a scalar score), and its Bradley-Terry training.

R1's preference stage scores helpfulness on the final answer only (mode "answer": the text after the think block, tags
removed) and harmlessness on the whole response (mode "full"). The mode is the reward model's view of a completion and
belongs to the model: `train_bradley_terry` trains on `prompt + response_text(completion, mode)` and records the mode
in the model folder (`reward_view.json`), and `RewardModelScorer` reads it from there, so a model is scored on the view
it was trained on (asking for another one is refused). A folder without the record (trained elsewhere) is scored on the
mode the caller gives. The scored text is `prompt + response`, truncated from the left so the end of the response is
always seen. Models load with `trust_remote_code=False` from safetensors only.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from rewards.parsing import ANSWER_CLOSE, ANSWER_OPEN, after_think

log = logging.getLogger(__name__)

Mode = Literal["answer", "full"]
MODES = ("answer", "full")
DTYPES = ("float32", "bfloat16", "float16")
VIEW_FILE = "reward_view.json"  # {"mode": ...}: the view the reward model was trained on


def response_text(completion: str, mode: Mode) -> str:
    """What the reward model reads of a completion: the final answer ("answer") or everything ("full")."""
    if mode == "full":
        return completion
    if mode == "answer":
        text = after_think(completion)
        return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "").strip()
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


def recorded_mode(path: str | Path) -> Mode | None:
    """The view a reward model folder was trained on (its `reward_view.json`), None when it has no record."""
    record = Path(path) / VIEW_FILE
    if not record.is_file():
        return None
    mode = json.loads(record.read_text()).get("mode")
    if mode not in MODES:
        raise ValueError(f"{record}: unknown mode {mode!r}; known: {MODES}")
    return mode


def scoring_mode(path: str | Path, mode: Mode | None) -> Mode:
    """The view to score the reward model at `path` on: the recorded one; `mode` (default "answer") without a record.
    A `mode` other than the recorded one is refused: the model would read texts unlike the ones it learnt from."""
    if mode is not None:
        response_text("", mode)  # validates it
    recorded = recorded_mode(path)
    if recorded is None:
        return mode or "answer"
    if mode is not None and mode != recorded:
        raise ValueError(f"reward model {path} was trained on the {recorded!r} view of a completion ({VIEW_FILE}); "
                         f"scoring it on the {mode!r} view would read texts unlike the ones it learnt from")
    return recorded


def _prepare_tokenizer(tokenizer, model):
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; batched scoring needs one")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:  # the model finds each row's last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"
    return tokenizer


def _load(path: str | Path, device: str, dtype: str = "float32"):
    """Any Hugging Face sequence-classification model folder with one label: safetensors only, no remote code."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"reward model {str(path)!r} is not a model folder")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"reward model {path}: no *.safetensors weights (pickle weights are refused)")
    labels = AutoConfig.from_pretrained(str(path), trust_remote_code=False).num_labels
    if labels != 1:  # asking from_pretrained for one label would silently start a new, untrained head
        raise ValueError(f"reward model {path} has num_labels={labels}; a reward model scores with one output")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), trust_remote_code=False, use_safetensors=True, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return model.to(device), _prepare_tokenizer(tokenizer, model)


def _scores(model, tokenizer, texts: list[str], max_length: int, device: str):
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch).logits[:, 0]


class RewardModelScorer:
    """Scores completions with a reward model; callable as a reward function `(prompts, completions, **columns)`."""

    process = False  # one score per completion (see `rewards.process.process_reward_model` for per-step scores)

    def __init__(
        self,
        path: str | Path,
        mode: Mode | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        mode = scoring_mode(path, mode)  # before loading anything
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1 (got {batch_size}, {max_length})")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {DTYPES}")
        self.path, self.mode, self.batch_size, self.max_length, self.device = (
            str(path),
            mode,
            batch_size,
            max_length,
            device,
        )
        self.model, self.tokenizer = _load(path, device, dtype)
        self.model.eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and self.max_length > limit:  # keep the end of long texts within what the model was built for
            self.max_length = limit

    def score(self, texts: Sequence[str]) -> list[float]:
        """Raw scalar scores of full texts, in batches."""
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                out.extend(
                    _scores(
                        self.model, self.tokenizer, list(texts[i : i + self.batch_size]), self.max_length, self.device
                    )
                    .float()
                    .tolist()
                )
        return out

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return self.score([p + response_text(c, self.mode) for p, c in zip(prompts, completions)])

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.path!r}, mode={self.mode!r})"


def pairwise_accuracy(scorer, pairs: Sequence[tuple[str, str, str]]) -> float:
    """Share of (prompt, chosen, rejected) completion pairs where the chosen one scores higher (a `RewardModelScorer`,
    which reads each completion through its view)."""
    prompts = [p for p, _, _ in pairs]
    chosen = scorer(prompts, [c for _, c, _ in pairs])
    rejected = scorer(prompts, [r for _, _, r in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / max(len(pairs), 1)


def train_bradley_terry(
    model_or_path,
    tokenizer,
    pairs: Sequence[tuple[str, str, str]],
    mode: Mode,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 8,
    out_dir: str | Path = "reward_model",
    max_length: int = 1024,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Fit a scalar reward model on (prompt, chosen, rejected) completion pairs with the Bradley-Terry loss
    -log sigmoid(r(prompt + view(chosen)) - r(prompt + view(rejected))), view = `response_text(., mode)`; save model,
    tokenizer (safetensors) and the mode (`reward_view.json`, which the scorer reads) to `out_dir`.

    `model_or_path`: a sequence-classification model with one label, or a path to one (`tokenizer` None loads it
    from the same path). Returns `out_dir` as a string, ready for `RewardModelScorer`.
    """
    import torch
    import torch.nn.functional as F

    if not pairs:
        raise ValueError("train_bradley_terry needs at least one (prompt, chosen, rejected) pair")
    pairs = [(p, response_text(c, mode), response_text(r, mode)) for p, c, r in pairs]  # also validates mode
    if isinstance(model_or_path, (str, Path)):
        model, loaded_tok = _load(model_or_path, device)
        tokenizer = tokenizer or loaded_tok
    else:
        model = model_or_path.to(device)
    if tokenizer is None:
        raise ValueError("a tokenizer is required when a model object is given")
    if model.config.num_labels != 1:
        raise ValueError(f"a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
    tokenizer = _prepare_tokenizer(copy.deepcopy(tokenizer), model)  # the caller's tokenizer stays as it was

    torch.manual_seed(seed)
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for epoch in range(epochs):
        rng.shuffle(order)
        total, steps = 0.0, 0
        for i in range(0, len(order), batch_size):
            chunk = [pairs[j] for j in order[i : i + batch_size]]
            texts = [p + c for p, c, _ in chunk] + [p + r for p, _, r in chunk]  # one forward for both sides
            r = _scores(model, tokenizer, texts, max_length, device)
            loss = -F.logsigmoid(r[: len(chunk)] - r[len(chunk) :]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        log.info("bradley-terry epoch %d: mean loss %.4f", epoch + 1, total / steps)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / VIEW_FILE).write_text(json.dumps({"mode": mode}))
    return str(out)
