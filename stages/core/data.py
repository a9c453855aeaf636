"""Prompts and data sets: from a generated task family, a local dataset, or a hub id; templating; held-out splits.

Every source goes through the same held-out rule (`split_of` on the question text), so no stage ever trains on an
evaluation question, whatever the source.

datasets is imported inside functions: preflight imports this module, and `r1 validate` must start fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

from stages.core.config_base import expand_path
from stages.core.configs import DataSource
from stages.core.tasks import Problem, make_problems

log = logging.getLogger(__name__)

REQUIRED = ("question", "answer")
COT_COLUMNS = ("prompt", "completion", "question", "answer")
EVAL_BUCKETS = 10  # one question in ten (by a stable hash) is held out for evaluation, never trained on


def split_of(question: str) -> str:
    """'eval' or 'train', stable across runs and processes (crc32 of the question text)."""
    return "eval" if zlib.crc32(question.encode()) % EVAL_BUCKETS == 0 else "train"


class DataInputError(ValueError):
    """A data set that cannot be used; the message names the file and the column."""


def load_problems(src: DataSource, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """Up to n problems of one split ('train' or 'eval') from the source."""
    n = n or src.num_prompts
    if src.source == "generated":
        out: list[Problem] = []
        batch_seed = seed
        while len(out) < n:
            batch = make_problems(src.task, max(n, 256), batch_seed, max_digits=src.max_digits)
            out.extend(p for p in batch if split_of(p.question) == split)
            batch_seed += 7919
            if batch_seed > seed + 7919 * 200:
                raise DataInputError(f"task {src.task!r} cannot produce {n} {split} problems")
        return out[:n]
    rows = _read_rows(src)
    probs = [_to_problem(r, src, i) for i, r in enumerate(rows)]
    picked = [p for p in probs if split_of(p.question) == split][:n]
    if not picked:
        raise DataInputError(f"dataset {src.path}: no {split} rows (of {len(probs)})")
    return picked


def read_dataset(src: DataSource, what: str = "dataset"):
    """A Hugging Face Dataset from a DataSource with source `path` (save_to_disk folder, .parquet, .jsonl, .json) or
    `hub`; errors name the file (`what` says which data set it is, for the message)."""
    import datasets

    path = src.path
    if src.source == "hub":
        return datasets.load_dataset(path, split=src.split)
    if src.source != "path":
        raise DataInputError(f"{what} must be a data set (source: path or hub), not source={src.source}")
    p = expand_path(path)
    if not p.exists():
        raise DataInputError(f"{what} path {path!r} does not exist")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataInputError(f"{what} {path}: no split {src.split!r} (splits: {list(ds)})")
            ds = ds[src.split]
        return ds
    if p.suffix in (".parquet", ".jsonl", ".json"):
        try:
            return datasets.load_dataset(p.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(p),
                                         split="train")
        except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types for a malformed file
            raise DataInputError(f"{what} {path}: cannot be read ({type(e).__name__}: {str(e)[:300]})") from None
    raise DataInputError(f"{what} {path!r}: expected a save_to_disk folder, .parquet, .jsonl or .json")


def _read_rows(src: DataSource) -> list[dict]:
    path = src.path
    ds = read_dataset(src)
    names = {ours: src.columns.get(ours, ours) for ours in ("question", "answer", "task", "metadata", "prompt_id")}
    missing = [f"{names[c]!r} (for {c})" for c in REQUIRED if names[c] not in ds.column_names]
    if missing:
        raise DataInputError(f"dataset {path}: missing column(s) {', '.join(missing)}; it has {ds.column_names}. "
                             "Map them with data.columns: {question: <col>, answer: <col>}")
    return [{ours: row.get(theirs) for ours, theirs in names.items()} for row in ds]


def _to_problem(row: dict, src: DataSource, i: int) -> Problem:
    empty = [c for c in REQUIRED if row[c] is None]
    if empty:  # str(None) would train on the prompt "None"
        raise DataInputError(f"dataset {src.path}: row {i} has no value (null) for {', '.join(map(repr, empty))}")
    meta = row.get("metadata")
    return Problem(question=str(row["question"]), answer=str(row["answer"]), task=str(row.get("task") or "math"),
                   metadata=meta if isinstance(meta, str) else json.dumps(meta or {}, default=str))


def prompt_rows(problems: list[Problem], template: str, prefix: str = "p") -> list[dict]:
    """Rows for the GRPO engine: `prompt` (templated) plus the columns rewards read."""
    return [{"prompt": template.format(question=p.question), "question": p.question, "answer": p.answer,
             "task": p.task, "metadata": p.metadata, "prompt_id": f"{prefix}{i}"} for i, p in enumerate(problems)]


def save_rows(rows: list[dict], path: str | Path) -> Path:
    """A Hugging Face dataset on disk (written to a temporary name, then renamed)."""
    import datasets

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_rows(path: str | Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(path)).to_list()


def load_cot_dataset(src, template: str, limit: int | None = None) -> list[dict]:
    """Prompt/completion examples from a CoT dataset: columns `prompt` + `completion`, or `question` + `answer` +
    `completion` (the prompt is then the recipe template around the question). `src.columns` maps these names to the
    dataset's. Rows whose question is held out for evaluation are dropped (the prompt is matched against the template
    when there is no question column). The completion follows the prompt as is."""
    ds, where = read_dataset(src, "CoT dataset"), src.path
    names = {ours: src.columns.get(ours, ours) for ours in COT_COLUMNS}
    have = set(ds.column_names)

    def missing(*ours):
        return [f"{names[c]!r}" + (f" (for {c})" if names[c] != c else "") for c in ours if names[c] not in have]

    if missing("completion"):
        raise DataInputError(f"CoT dataset {where}: missing column {missing('completion')[0]}; it has "
                             f"{ds.column_names}. Map it with data.columns: {{completion: <col>}}")
    if names["prompt"] not in have and missing("question", "answer"):
        raise DataInputError(f"CoT dataset {where}: missing column(s) {', '.join(missing('question', 'answer'))} "
                             f"(needed without a {names['prompt']!r} column); it has {ds.column_names}")
    pattern = _template_pattern(template)
    out, held_out = [], 0
    for i, row in enumerate(ds):
        completion = row[names["completion"]]
        question = row.get(names["question"])
        if names["prompt"] in have:
            prompt = row[names["prompt"]]
            if question is None and (m := pattern.fullmatch(str(prompt))):
                question = m.group(1)
        else:
            prompt = template.format(question=question)
        if prompt is None or completion is None or not str(completion).strip():
            raise DataInputError(f"CoT dataset {where}: row {i} has an empty prompt or completion")
        if question is not None and split_of(str(question)) == "eval":
            held_out += 1
            continue
        answer = row.get(names["answer"])
        out.append({"prompt": str(prompt), "completion": str(completion),
                    "question": "" if question is None else str(question),
                    "answer": "" if answer is None else str(answer), "kind": "reasoning", "source_run": where,
                    "prompt_id": f"d{i}"})
        if limit and len(out) >= limit:
            break
    if held_out:
        log.info("CoT dataset %s: %d rows with held-out (eval) questions dropped", where, held_out)
    if not out:
        raise DataInputError(f"CoT dataset {where}: no usable rows ({held_out} held out for evaluation)")
    return out


def _template_pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition("{question}")
    return re.compile(re.escape(head) + "(.*)" + re.escape(tail), re.DOTALL)

