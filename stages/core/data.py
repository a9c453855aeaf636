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
from dataclasses import dataclass, field
from pathlib import Path

from stages.core.config_base import expand_path
from stages.core.configs import DataSource
from stages.core.recipe import PromptConfig
from stages.core.tasks import Problem, make_problems

log = logging.getLogger(__name__)

REQUIRED = ("question", "answer")  # a problem's columns; a conversation (messages, or prompt as turns) stands in
CONVERSATION = ("messages", "prompt")  # for the question: its last user turn is the question
COT_COLUMNS = ("prompt", "completion", "question", "answer", "messages")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
EVAL_BUCKETS = 10  # one question in ten (by a stable hash) is held out for evaluation, never trained on


def split_of(question: str) -> str:
    """'eval' or 'train', stable across runs and processes (crc32 of the question text)."""
    return "eval" if zlib.crc32(question.encode()) % EVAL_BUCKETS == 0 else "train"


class DataInputError(ValueError):
    """A data set that cannot be used; the message names the file and the column."""


@dataclass
class ChatProblem(Problem):
    """A problem given as a conversation (the turns before the reply); `question` is its last user turn."""

    messages: list[dict] = field(default_factory=list)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def turns(value, where: str) -> list[dict]:
    """A conversation as a list of {role, content} turns (a JSON string, as csv/parquet store it, is parsed)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataInputError(f"{where}: expected a list of {{role, content}} turns, got text") from None
    ok = isinstance(value, list) and value and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value)
    if not ok:
        raise DataInputError(f"{where}: expected a non-empty list of {{role, content}} turns, got {value!r:.120}")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def last_user_turn(msgs: list[dict], where: str) -> str:
    users = [t["content"] for t in msgs if t["role"] == "user"]
    if not users:
        raise DataInputError(f"{where}: the conversation has no user turn")
    return users[-1]


def with_system(msgs: list[dict], system: str | None) -> list[dict]:
    """The recipe's system turn first, unless there is none or the conversation brings its own."""
    if system is None or (msgs and msgs[0]["role"] == "system"):
        return list(msgs)
    return [{"role": "system", "content": system}, *msgs]


def chat_prompt(tokenizer, msgs: list[dict]) -> str:
    """The model's chat template around `msgs`, ending where the assistant's reply starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataInputError(f"prompt.style is chat, but the tokenizer of {tokenizer.name_or_path!r} has no chat "
                             "template; give a model with one, or set prompt.style: template")
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def render_chat(rows: list[dict], tokenizer) -> list[dict]:
    """Rows with `messages` (prompt_rows, style chat) get their `prompt` through the chat template; others pass."""
    return [{k: v for k, v in r.items() if k != "messages"} | {"prompt": chat_prompt(tokenizer, r["messages"])}
            if "messages" in r else r for r in rows]


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
    """A Hugging Face Dataset from a DataSource with source `path` (save_to_disk folder, .parquet, .jsonl, .json (a
    list of rows), .csv) or `hub`; errors name the file (`what` says which data set it is, for the message)."""
    import datasets

    path = src.path
    if src.source == "hub":
        return _hub_dataset(path, src.split, what)
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
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(p.suffix)
    if builder is None:
        raise DataInputError(f"{what} {path!r}: expected a save_to_disk folder, .parquet, .jsonl, .json or .csv")
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types for a malformed file
        raise DataInputError(f"{what} {path}: cannot be read ({type(e).__name__}: {str(e)[:300]})") from None


def _hub_dataset(name: str, split: str, what: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises several types for a missing or unreachable data set
        if hub_offline():
            raise DataInputError(
                f"{what} {name!r} is not in the local cache and HF_HUB_OFFLINE is set: download it first with "
                f"`huggingface-cli download --repo-type dataset {name}` where a network exists ({type(e).__name__})"
            ) from None
        raise DataInputError(f"{what} {name!r} (split {split!r}) could not be loaded from the hub: {e}") from e


def _read_rows(src: DataSource) -> list[dict]:
    path = src.path
    ds = read_dataset(src)
    ours = ("question", "answer", "task", "metadata", "prompt_id", *CONVERSATION)
    names = {c: src.columns.get(c, c) for c in ours}
    have = ds.column_names
    need = ["answer"] + ([] if any(names[c] in have for c in CONVERSATION) else ["question"])
    missing = [f"{names[c]!r} (for {c})" for c in need if names[c] not in have]
    if missing:
        raise DataInputError(f"dataset {path}: missing column(s) {', '.join(missing)}; it has {have}. "
                             "Map them with data.columns: {question: <col>, answer: <col>} (or a conversation: "
                             "{messages: <col>} / {prompt: <col>} as turns)")
    return [{c: row.get(theirs) for c, theirs in names.items()} for row in ds]


def _to_problem(row: dict, src: DataSource, i: int) -> Problem:
    conversation = any(row.get(c) is not None for c in CONVERSATION)  # then the question may come from its turns
    empty = [c for c in REQUIRED if row[c] is None and not (c == "question" and conversation)]
    if empty:  # str(None) would train on the prompt "None"
        raise DataInputError(f"dataset {src.path}: row {i} has no value (null) for {', '.join(map(repr, empty))}")
    meta = row.get("metadata")
    common = {"answer": str(row["answer"]), "task": str(row.get("task") or "math"),
              "metadata": meta if isinstance(meta, str) else json.dumps(meta or {}, default=str)}
    conv = next((c for c in CONVERSATION if row.get(c) is not None and not _is_text_prompt(row, c)), None)
    if conv is None:
        if row.get("question") is None:
            raise DataInputError(f"dataset {src.path}, row {i}: no question (column "
                                 f"{src.columns.get('question', 'question')!r}) and no conversation")
        return Problem(question=str(row["question"]), **common)
    where = f"dataset {src.path}, row {i}, column {src.columns.get(conv, conv)!r}"
    msgs = turns(row[conv], where)
    while msgs and msgs[-1]["role"] == "assistant":  # a reference reply is not part of the prompt
        msgs.pop()
    question = row.get("question")
    return ChatProblem(question=str(question) if question is not None else last_user_turn(msgs, where),
                       messages=msgs, **common)


def _is_text_prompt(row: dict, column: str) -> bool:
    return column == "prompt" and isinstance(row[column], str) and not row[column].lstrip().startswith("[")


def prompt_rows(problems: list[Problem], prompt: PromptConfig, prefix: str = "p") -> list[dict]:
    """Rows for the GRPO engine: `prompt` (templated) plus the columns rewards read. With prompt.style chat a row
    carries `messages` instead (the system turn, then the problem's turns or its question as a user turn), which
    `render_chat` turns into the prompt once the model's tokenizer is at hand."""
    rows = []
    for i, p in enumerate(problems):
        msgs = getattr(p, "messages", None)
        if prompt.style == "chat":
            head = {"messages": with_system(msgs or [{"role": "user", "content": p.question}], prompt.system)}
        elif msgs:
            raise DataInputError(f"problem {p.question[:60]!r} is a conversation (messages or prompt as turns): set "
                                 "prompt.style: chat to apply the model's chat template")
        else:
            head = {"prompt": prompt.template.format(question=p.question)}
        rows.append(head | {"question": p.question, "answer": p.answer, "task": p.task, "metadata": p.metadata,
                            "prompt_id": f"{prefix}{i}"})
    return rows


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


def load_cot_dataset(src, prompt: PromptConfig, limit: int | None = None) -> list[dict]:
    """Prompt/completion examples from a CoT dataset: columns `prompt` + `completion`, or `question` + `answer` +
    `completion` (the prompt is then the recipe template around the question), or a conversation: `messages` (the last
    turn is the assistant's reply, the one trained on) or `prompt` as turns + `completion`. `src.columns` maps these
    names to the dataset's. Conversations need prompt.style chat and get the recipe's system turn; with style chat a
    question row becomes a user turn. Rows whose question is held out for evaluation are dropped (the prompt is matched
    against the template when there is no question column). The completion follows the prompt as is."""
    ds, where = read_dataset(src, "CoT dataset"), src.path
    names = {ours: src.columns.get(ours, ours) for ours in COT_COLUMNS}
    have = set(ds.column_names)

    def missing(*ours):
        return [f"{names[c]!r}" + (f" (for {c})" if names[c] != c else "") for c in ours if names[c] not in have]

    if names["messages"] not in have:
        if missing("completion"):
            raise DataInputError(f"CoT dataset {where}: missing column {missing('completion')[0]}; it has "
                                 f"{ds.column_names}. Map it with data.columns: {{completion: <col>}} (or give "
                                 "a messages column)")
        if names["prompt"] not in have and missing("question", "answer"):
            raise DataInputError(f"CoT dataset {where}: missing column(s) {', '.join(missing('question', 'answer'))} "
                                 f"(needed without a {names['prompt']!r} column); it has {ds.column_names}")
    pattern = _template_pattern(prompt.template)
    out, held_out = [], 0
    for i, row in enumerate(ds):
        ex, question = _cot_example(row, names, prompt, pattern, f"CoT dataset {where}, row {i}")
        if question is not None and split_of(str(question)) == "eval":
            held_out += 1
            continue
        answer = row.get(names["answer"])
        out.append(ex | {"question": "" if question is None else str(question),
                         "answer": "" if answer is None else str(answer), "kind": "reasoning", "source_run": where,
                         "prompt_id": f"d{i}"})
        if limit and len(out) >= limit:
            break
    if held_out:
        log.info("CoT dataset %s: %d rows with held-out (eval) questions dropped", where, held_out)
    if not out:
        raise DataInputError(f"CoT dataset {where}: no usable rows ({held_out} held out for evaluation)")
    return out


def _cot_example(row: dict, names: dict, prompt: PromptConfig, pattern: re.Pattern, where: str):
    """({prompt, completion} or {messages, completion}, the question or None) of one CoT row."""
    question = row.get(names["question"])
    text_prompt = row.get(names["prompt"])
    if row.get(names["messages"]) is not None:
        msgs = turns(row[names["messages"]], f"{where}, column {names['messages']!r}")
        if msgs[-1]["role"] != "assistant":
            raise DataInputError(f"{where}: the last turn of {names['messages']!r} must be the assistant's reply")
        context, completion = msgs[:-1], msgs[-1]["content"]
    else:
        completion = row.get(names["completion"])
        if isinstance(completion, list) or (isinstance(completion, str) and completion.lstrip().startswith("[{")):
            completion = "".join(t["content"] for t in turns(completion, f"{where}, column {names['completion']!r}"))
        if text_prompt is not None and not (isinstance(text_prompt, str) and not text_prompt.lstrip().startswith("[")):
            context, text_prompt = turns(text_prompt, f"{where}, column {names['prompt']!r}"), None
        elif text_prompt is None and prompt.style == "chat" and question is not None:
            context = [{"role": "user", "content": str(question)}]
        else:
            context = None
    if completion is None or not str(completion).strip():
        raise DataInputError(f"{where} has an empty completion")
    if context is not None:
        if prompt.style != "chat":
            raise DataInputError(f"{where} is a conversation: set prompt.style: chat to apply the model's chat template")
        question = question if question is not None else last_user_turn(context, where)
        msgs = with_system(context, prompt.system) + [{"role": "assistant", "content": str(completion)}]
        return {"messages": msgs, "completion": str(completion)}, question
    if text_prompt is None:
        if question is None:
            raise DataInputError(f"{where} has an empty prompt")
        text_prompt = prompt.template.format(question=question)
    elif question is None and (m := pattern.fullmatch(str(text_prompt))):
        question = m.group(1)
    return {"prompt": str(text_prompt), "completion": str(completion)}, question


def load_preference_pairs(src, prompt: PromptConfig, limit: int | None = None) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts from a preference data set (columns prompt, chosen, rejected; map others with
    `src.columns`), as a reward model reads them: the recipe template around the prompt, each reply after a space.
    Rows whose prompt is held out for evaluation are dropped."""
    ds, where = read_dataset(src, "preference data set"), src.path
    names = {ours: src.columns.get(ours, ours) for ours in PAIR_COLUMNS}
    lacking = [f"{names[c]!r}" + (f" (for {c})" if names[c] != c else "") for c in PAIR_COLUMNS
               if names[c] not in ds.column_names]
    if lacking:
        raise DataInputError(f"preference data set {where}: missing column(s) {', '.join(lacking)}; it has "
                             f"{ds.column_names}. Map them with columns: {{prompt: <col>, chosen: <col>, ...}}")
    out = []
    for i, row in enumerate(ds):
        p, chosen, rejected = (row[names[c]] for c in PAIR_COLUMNS)
        if not all(isinstance(x, str) and x.strip() for x in (p, chosen, rejected)):
            raise DataInputError(f"preference data set {where}, row {i}: prompt, chosen and rejected must be "
                                 "non-empty text")
        if split_of(p) == "eval":
            continue
        out.append((prompt.template.format(question=p), " " + chosen.strip(), " " + rejected.strip()))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataInputError(f"preference data set {where}: no usable rows")
    return out


def _template_pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition("{question}")
    return re.compile(re.escape(head) + "(.*)" + re.escape(tail), re.DOTALL)

