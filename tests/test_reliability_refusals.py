"""Early refusal: each bad input below fails before any model is loaded (loading one fails these tests), with a message
naming the recipe field or the file. The README's "Reliability: faults and refusals" tables are generated from this
module (`python -m tests.test_reliability_refusals`), and a test keeps them in step with it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MINI

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- reliability-tables:begin -->", "<!-- reliability-tables:end -->"


@dataclass
class Refusal:
    name: str
    bad_input: str  # what the user did (README column)
    refused_by: str  # where it is caught
    expect: str  # regex the message must match (it names the field or the file)
    run: Callable[[Path], None]  # raises the refusal, given a workspace folder


def _recipe(ws: Path, **over):
    from stages.core.recipe import load_recipe

    return load_recipe("tiny", {**MINI, "tracking.uri": f"sqlite:///{ws}/mlflow.db", "output_dir": str(ws / "runs"),
                                **over})


def _stage(name: str, ws: Path, inputs: dict | None = None, **over) -> None:
    """The stage's own entry (what `r1 stage`, `python -m stages.entry` and the launchers run)."""
    from stages.registry import runnable

    runnable()[name](_recipe(ws, **over), inputs=inputs, progress=False)


def _pipeline(stages: list[str], ws: Path, **over) -> None:
    """What the pipeline flow runs before its first stage."""
    from stages.core.preflight import preflight

    preflight(_recipe(ws, **over), stages)


def model_dir(ws: Path, variant: str = "ok") -> str:
    """A small Hugging Face model folder (random weights, a trained tokenizer with the chat template), or a broken one."""
    base = ws / "models" / "ok"
    if not base.exists():
        from stages.core.tasks import clean_trace, make_problems
        from stages.core.tokenizer import train_tokenizer
        from tests.conftest import build_tiny_model

        texts = [f"User: {p.question}\nAssistant:{clean_trace(p)}" for p in make_problems("addition", 50, 0)]
        tok = train_tokenizer(texts, vocab_size=300)
        model = build_tiny_model(tok, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
        model.save_pretrained(base)
        tok.save_pretrained(base)
    if variant == "ok":
        return str(base)
    out = ws / "models" / variant
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    if variant == "pickle":
        for f in out.glob("*.safetensors"):
            f.rename(out / "pytorch_model.bin")
    elif variant == "no_tokenizer":
        for f in ("tokenizer.json", "vocab.json", "tokenizer.model"):
            (out / f).unlink(missing_ok=True)
    elif variant == "no_chat_template":
        (out / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif variant == "config_list":
        (out / "config.json").write_text("[]")
    elif variant == "not_causal":
        cfg = json.loads((out / "config.json").read_text())
        cfg["architectures"] = ["Qwen2ForSequenceClassification"]
        (out / "config.json").write_text(json.dumps(cfg))
    elif variant == "truncated_weights":
        for f in out.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif variant == "custom_code":
        cfg = json.loads((out / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def data_file(ws: Path, drop: tuple[str, ...] = (), name: str = "prompts.jsonl") -> str:
    from stages.core.tasks import clean_trace, make_problems

    path = ws / name
    with open(path, "w") as f:
        for p in make_problems("addition", 40, seed=3):
            row = {"question": p.question, "answer": p.answer, "completion": " " + clean_trace(p)}
            f.write(json.dumps({k: v for k, v in row.items() if k not in drop}) + "\n")
    return str(path)


def _recipe_file(ws: Path, text: str | bytes) -> None:
    from stages.core.recipe import load_recipe

    path = ws / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    load_recipe(path)


def _data(ws: Path, name: str, text: str) -> dict:
    (ws / name).write_text(text)
    return {"r1_zero.data": {"source": "path", "path": str(ws / name)}}


def _pretrained(ws: Path, variant: str = "ok") -> dict:
    return {"base_model.source": "pretrained", "base_model.path": model_dir(ws, variant)}


def _busy(ws: Path) -> None:
    """A second run of a stage while the first still holds its work dir."""
    from stages.core.attempts import work_lock

    work = ws / "runs" / "r1_zero" / "k"
    work.mkdir(parents=True)
    with work_lock(work, "r1_zero"), work_lock(work, "r1_zero"):
        pass


def _other_model_checkpoint(ws: Path) -> None:
    from grpo.checkpoint import save_checkpoint
    from grpo.engine import TorchEngine, lr_lambda
    from grpo.trainer import GRPOTrainer
    from stages.core.models import load_tokenizer
    from tests.conftest import build_tiny_model
    from tests.test_grpo_trainer import small_config
    from tests.test_reliability_numerics import _len_reward

    tok = load_tokenizer(model_dir(ws))
    small = build_tiny_model(tok)
    opt = __import__("torch").optim.AdamW(small.parameters())
    engine = TorchEngine(small, opt, __import__("torch").optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 1, "constant")),
                         1.0)
    save_checkpoint(ws / "ckpt" / "checkpoint-1", engine, None, {"global_step": 1, "sampler": {}, "world_size": 1})
    rows = [{"prompt": "User: 1+2\nAssistant:"}]
    GRPOTrainer(build_tiny_model(tok, hidden_size=48, intermediate_size=96), tok, small_config(), rows,
                [("r", _len_reward, 1.0)], output_dir=ws / "ckpt", progress=False).train(resume_from="latest")


REFUSALS = [
    Refusal("unknown_key", "a misspelt recipe key: `r1_zero.grpo.lr: 1e-3`", "recipe load",
            r"r1_zero\.grpo\.lr: Extra inputs are not permitted", lambda ws: _recipe(ws, **{"r1_zero.grpo.lr": 1e-3})),
    Refusal("bad_value", "an invalid value: `r1_zero.grpo.learning_rate: -1`", "recipe load",
            r"r1_zero\.grpo\.learning_rate: Input should be greater than 0",
            lambda ws: _recipe(ws, **{"r1_zero.grpo.learning_rate": -1})),
    Refusal("group_too_small", "G too small for std scaling: `r1_zero.grpo.num_generations: 1`", "recipe load",
            r"r1_zero\.grpo: .*num_generations=1: a group needs at least 2 completions",
            lambda ws: _recipe(ws, **{"r1_zero.grpo.num_generations": 1})),
    Refusal("template", "a prompt template without `{question}`", "recipe load",
            r"prompt: .*template must contain the placeholder \{question\}",
            lambda ws: _recipe(ws, **{"prompt.template": "Solve it.\nAssistant:"})),
    Refusal("empty_recipe", "an empty recipe file (it would validate as the `tiny` preset)", "recipe load",
            r"recipe file .*/recipe\.yaml is empty", lambda ws: _recipe_file(ws, "# nothing yet\n")),
    Refusal("duplicate_key", "a key given twice (YAML keeps the last)", "recipe load",
            r"duplicate key 'seed' \(first on line 1\)", lambda ws: _recipe_file(ws, "seed: 1\nname: x\nseed: 2\n")),
    Refusal("alias_bomb", "a YAML alias bomb (300 bytes, gigabytes expanded)", "recipe load",
            r"anchors and aliases \(&name, \*name\) are not allowed in a recipe",
            lambda ws: _recipe_file(ws, "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n")),
    Refusal("binary_recipe", "a recipe file that is not UTF-8 text", "recipe load",
            r"recipe file .*/recipe\.yaml is not UTF-8 text \(byte 2", lambda ws: _recipe_file(ws, b"a:\xff\x00")),
    Refusal("non_finite", "a non-finite number: `--set r1_zero.grpo.beta=.nan` (NaN > 0 is false: no KL)", "recipe load",
            r"--set r1_zero\.grpo\.beta=nan: r1_zero\.grpo\.beta: nan is not a finite number",
            lambda ws: _recipe(ws, **{"r1_zero.grpo.beta": float("nan")})),
    Refusal("bool_as_number", "`true` where a number belongs: `seed: true`", "recipe load",
            r"seed: Input should be a valid integer \(got True\)", lambda ws: _recipe(ws, seed=True)),
    Refusal("absurd_size", "an absurd size: `r1_zero.grpo.num_generations: 1000000`", "recipe load",
            r"r1_zero: grpo\.num_generations=1000000: at most 1024 completions per prompt",
            lambda ws: _recipe(ws, **{"r1_zero.grpo.num_generations": 1_000_000})),
    Refusal("recipe_name", "a recipe name MLflow's registry cannot take: `name: my/recipe:v2`", "recipe load",
            r"name: String should match pattern", lambda ws: _recipe(ws, name="my/recipe:v2")),
    Refusal("template_braces", "a template with other braces than `{question}`", "recipe load",
            r"prompt: template: only \{question\} is filled in; \{answer\} would fail",
            lambda ws: _recipe(ws, **{"prompt.template": "User: {question} {answer}\nAssistant:"})),
    Refusal("bad_cron", "a schedule with a bad cron or time zone", "recipe load",
            r"schedules\.0: cron '0 25 \* \* \*' is not a valid cron expression",
            lambda ws: _recipe(ws, schedules=[{"flow": "pipeline", "cron": "0 25 * * *"}])),
    Refusal("memory_store", "`tracking.uri: sqlite:///` (an in-memory store, lost)", "recipe load",
            r"tracking\.uri: sqlite:/// needs a file path", lambda ws: _recipe(ws, **{"tracking.uri": "sqlite:///"})),
    Refusal("tracking_scheme", "a tracking URI with an unknown scheme", "recipe load",
            r"tracking\.uri: unknown scheme 'mlfow'", lambda ws: _recipe(ws, **{"tracking.uri": "mlfow://host"})),
    Refusal("bad_set", "`--set` with invalid YAML", "`--set` parsing (CLI)",
            r"--set r1_zero\.grpo\.beta=\[0\.1 is not valid YAML",
            lambda ws: _cli(ws, ["validate", "tiny", "--set", "r1_zero.grpo.beta=[0.1"])),
    Refusal("no_recipe", "a recipe file that does not exist", "recipe load",
            r"recipe '.*/nope\.yaml' is neither a file nor a preset",
            lambda ws: __import__("stages.core.recipe").core.recipe.load_recipe(str(ws / "nope.yaml"))),
    Refusal("unknown_stage", "an unknown stage name: `r1 pipeline --stage r2_zero`", "preflight (CLI, before Prefect "
            "starts)", r"unknown stage 'r2_zero'", lambda ws: _cli(ws, ["pipeline", "--stage", "r2_zero"])),
    Refusal("unknown_reward", "an unknown reward name: `r1_zero.rewards: [{name: acuracy}]`", "preflight",
            r"r1_zero\.rewards\[0\] \(acuracy\): unknown reward 'acuracy'",
            lambda ws: _pipeline(["r1_zero"], ws, **{"r1_zero.rewards": [{"name": "acuracy"}]})),
    Refusal("unknown_reward_param", "an unknown reward parameter", "preflight",
            r"r1_zero\.rewards\[0\] \(format\): unknown param 'strict'",
            lambda ws: _pipeline(["r1_zero"], ws, **{"r1_zero.rewards": [{"name": "format", "params": {"strict": 1}}]})),
    Refusal("missing_base", "`base_model.path` that does not exist", "preflight",
            r"base_model\.path: model path '/no/such/model' does not exist",
            lambda ws: _pipeline(["base_model"], ws, **{"base_model.source": "pretrained",
                                                         "base_model.path": "/no/such/model"})),
    Refusal("pickle_weights", "a base model with pickle weights only (`pytorch_model.bin`)", "preflight",
            r"base_model\.path: no \*\.safetensors weights in .*/pickle \(found \['pytorch_model\.bin'\]: pickle "
            r"weights are refused", lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "pickle"))),
    Refusal("no_tokenizer", "a base model folder without tokenizer files", "preflight",
            r"base_model\.path: no tokenizer in .*/no_tokenizer",
            lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "no_tokenizer"))),
    Refusal("no_chat_template", "a base model whose tokenizer has no chat template", "preflight",
            r"base_model\.path: tokenizer in .*/no_chat_template has no chat template",
            lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "no_chat_template"))),
    Refusal("custom_code", "a model that ships its own code (`auto_map`), `trust_remote_code` off (the default)",
            "preflight", r"base_model\.path: .*/custom_code/config\.json asks to run code shipped with the model.*"
            r"base_model\.trust_remote_code", lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "custom_code"))),
    Refusal("missing_input", "a stage input path that does not exist: `r1 stage r1_zero --input-model /no/such/model`",
            "preflight (stage entry)", r"input model: model path '/no/such/model' does not exist",
            lambda ws: _stage("r1_zero", ws, {"model": "/no/such/model"})),
    Refusal("unknown_input", "an input the stage does not take: `r1 stage r1_zero --input teacher=...`", "CLI",
            r"--input 'teacher': stage r1_zero takes no such input; its inputs: \['model'\]",
            lambda ws: _cli(ws, ["stage", "r1_zero", "--input", "teacher=/m"])),
    Refusal("bad_run_uri", "a malformed `runs:/` URI", "preflight (before any MLflow run or work folder)",
            r"input model: 'runs:/abc/model' is not a runs:/ URI",
            lambda ws: _stage("r1_zero", ws, {"model": "runs:/abc/model"})),
    Refusal("missing_run", "a run id that does not exist", "preflight (before any MLflow run or work folder)",
            r"input model: '0{32}': no such run 0{32} in sqlite:///",
            lambda ws: _stage("r1_zero", ws, {"model": "0" * 32})),
    Refusal("context_too_long", "prompt + completion longer than the model's context", "preflight",
            r"r1_zero\.grpo\.max_completion_length: 250 completion \+ 64 prompt tokens .* exceed the 256-token "
            r"context", lambda ws: _pipeline(["r1_zero"], ws, **{"r1_zero.grpo.max_completion_length": 250})),
    Refusal("not_causal", "a model whose config is not a causal LM (it would load with random weights)", "preflight",
            r"base_model\.path: .*/config\.json: architecture Qwen2ForSequenceClassification is not a causal language "
            "model", lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "not_causal"))),
    Refusal("config_not_mapping", "a model `config.json` that is not a JSON object", "preflight",
            r"base_model\.path: .*/config\.json must hold a JSON object \(got list\)",
            lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "config_list"))),
    Refusal("truncated_weights", "truncated safetensors weights", "preflight (header only, no weights read)",
            r"base_model\.path: .*\.safetensors is not a readable safetensors file",
            lambda ws: _pipeline(["base_model"], ws, **_pretrained(ws, "truncated_weights"))),
    Refusal("truncated_data", "a JSONL data set whose last line is cut off", "preflight",
            r"r1_zero\.data\.path: .*/cut\.jsonl: line 2 is not valid JSON .*a truncated file",
            lambda ws: _pipeline(["r1_zero"], ws, **_data(ws, "cut.jsonl", '{"question": "1+1", "answer": "2"}\n'
                                                                         '{"question": "2+'))),
    Refusal("null_question", "a data row whose question is null (it would train on the text `None`)", "preflight",
            r"r1_zero\.data\.path: .*/null\.jsonl: line 2 has no value \(null\) for 'question'",
            lambda ws: _pipeline(["r1_zero"], ws, **_data(ws, "null.jsonl", '{"question": "1+1", "answer": "2"}\n'
                                                                          '{"question": null, "answer": "3"}\n'))),
    Refusal("rows_object", "a JSON object where a list of rows was expected", "preflight",
            r"r1_zero\.data\.path: .*/obj\.json: expected a JSON list of rows",
            lambda ws: _pipeline(["r1_zero"], ws, **_data(ws, "obj.json", '{"question": "1+1", "answer": "2"}'))),
    Refusal("missing_data", "a data set path that does not exist", "preflight",
            r"r1_zero\.data\.path: data set '.*/nope\.jsonl' does not exist",
            lambda ws: _pipeline(["r1_zero"], ws, **{"r1_zero.data": {"source": "path", "path": str(ws / "nope.jsonl")}})),
    Refusal("missing_column", "a data set without the `answer` column", "preflight",
            r"r1_zero\.data: data set .*/prompts\.jsonl has no column 'answer'; it has \['completion', 'question'\]",
            lambda ws: _pipeline(["r1_zero"], ws, **{"r1_zero.data": {"source": "path",
                                                                      "path": data_file(ws, drop=("answer",))}})),
    Refusal("prompt_too_long", "`max_prompt_length` shorter than the prompts", "preflight (base tokenizer)",
            r"r1_zero\.grpo\.max_prompt_length: 4 tokens, but the longest prompt of r1_zero\.data is \d+ tokens",
            lambda ws: _pipeline(["r1_zero"], ws, **_pretrained(ws), **{"r1_zero.grpo.max_prompt_length": 4})),
    Refusal("sft_too_short", "an SFT `max_length` shorter than the prompts", "preflight (base tokenizer)",
            r"cold_start_sft\.sft\.max_length: 8 tokens, but the longest prompt of cold_start_sft\.data is \d+ tokens",
            lambda ws: _pipeline(["cold_start_sft"], ws, **_pretrained(ws), **{
                "cold_start_sft.data": {"source": "path", "path": data_file(ws, name="cot.jsonl")},
                "cold_start_sft.sft.max_length": 8})),
    Refusal("tracking_down", "an unreachable tracking server: `tracking.uri: http://127.0.0.1:9`", "preflight",
            r"tracking\.uri: MLflow tracking server http://127\.0\.0\.1:9 is unreachable",
            lambda ws: _pipeline(["r1_zero"], ws, **{"tracking.uri": "http://127.0.0.1:9"})),
    Refusal("tracking_folder", "a sqlite tracking store in a folder that does not exist", "preflight",
            r"tracking\.uri: tracking\.uri sqlite:////no/such/dir/mlflow\.db: folder /no/such/dir does not exist",
            lambda ws: _pipeline(["r1_zero"], ws, **{"tracking.uri": "sqlite:////no/such/dir/mlflow.db"})),
    Refusal("unwritable_output", "an output directory that cannot be written", "preflight",
            r"output_dir: cannot write to .*/a_file/runs",
            lambda ws: _pipeline(["r1_zero"], ws, output_dir=str(_file(ws / "a_file") / "runs"))),
    Refusal("deepspeed_config", "a DeepSpeed config that does not exist", "preflight",
            r"cluster\.deepspeed_config: /no/such/zero3\.json does not exist",
            lambda ws: _pipeline(["r1_zero"], ws, **{"cluster.deepspeed_config": "/no/such/zero3.json"})),
    Refusal("launcher_tool", "`cluster.launcher: slurm` where `sbatch` is not installed", "preflight",
            r"cluster\.launcher: slurm needs `sbatch` on PATH",
            lambda ws: _pipeline(["r1_zero"], ws, **{"cluster.launcher": "slurm"})),
    Refusal("world_size", "a batch that does not split over the processes: 4 prompts per step on 3 ranks", "preflight",
            r"r1_zero\.grpo\.prompts_per_step: 4 is not divisible by the 3 processes",
            lambda ws: _pipeline(["r1_zero"], ws, **{"cluster.launcher": "torchrun", "cluster.nproc_per_node": 3,
                                                     "r1_zero.grpo.prompts_per_step": 4})),
    Refusal("nothing_to_make", "`synthesize` with both targets 0", "preflight",
            r"synthesize\.reasoning_target and synthesize\.general_target: both 0",
            lambda ws: _pipeline(["synthesize"], ws, **{"synthesize.reasoning_target": 0,
                                                        "synthesize.general_target": 0})),
    Refusal("busy", "a second run of a stage while the first is still running", "stage start (work-dir lock)",
            r"stage r1_zero: work dir .*/runs/r1_zero/k is in use by another run of the same stage \(pid \d+",
            _busy),
    Refusal("other_checkpoint", "a checkpoint written for another model (hidden size 32 vs 48)", "resume (right after "
            "the model loads, before any training step)",
            r"checkpoint .*/checkpoint-1 \(model_config\.json\) belongs to a different model \(hidden_size: 32 in the "
            r"checkpoint, 48 in the model", _other_model_checkpoint),
]


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    return path


def _cli(ws: Path, args: list[str]) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    sets = [x for k, v in {"tracking.uri": f"sqlite:///{ws}/mlflow.db", "output_dir": str(ws / "runs")}.items()
            for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(app, [*args, *sets])
    assert res.exit_code == 2, res.output
    raise SystemExit(" ".join(res.output.split()))  # the message as printed, wrapped lines joined


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load or build fails the test: refusals must come first."""
    import transformers

    import stages.base_model
    import stages.core.context
    import stages.core.models
    import stages.distill
    import stages.preference_rl

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    for module in (stages.core.models, stages.core.context, stages.base_model, stages.distill, stages.preference_rl):
        monkeypatch.setattr(module, "load_model", boom)  # where it is looked up
    monkeypatch.setattr(stages.base_model, "build_base_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


SEEN: dict[str, str] = {}  # case name -> its message as the README shows it (filled by the tests, reused for README)


def refusal_message(case: Refusal, ws: Path) -> str:
    try:
        case.run(ws)
    except (Exception, SystemExit) as e:
        if isinstance(e, AssertionError):
            raise
        SEEN[case.name] = _clean(str(e), ws)
        return str(e)
    raise AssertionError(f"{case.name}: not refused")


@pytest.mark.parametrize("case", [c for c in REFUSALS if c.name != "other_checkpoint"], ids=lambda c: c.name)
def test_bad_input_is_refused_before_any_model_loads(case, tmp_path, no_model_loads):
    msg = refusal_message(case, tmp_path)
    assert re.search(case.expect, msg, re.DOTALL), msg


def test_checkpoint_of_another_model_is_refused(tmp_path):
    case = next(c for c in REFUSALS if c.name == "other_checkpoint")
    assert re.search(case.expect, refusal_message(case, tmp_path), re.DOTALL)


def test_at_least_fifteen_distinct_refusals():
    assert len({c.name for c in REFUSALS}) == len(REFUSALS) >= 15


# ---- the README tables

FAULTS = [
    ("SIGKILL of a GRPO stage (r1_zero) after step 3, checkpoint at step 2", "test_reliability_faults",
     ("The next pipeline run resumes it from `checkpoint-2` (log: `stage r1_zero: resuming from …/checkpoint-2`) in a "
     "new MLflow run tagged `r1.resumed_from=<killed run>`; the killed run is marked KILLED (`r1.resumed_by`). Steps "
     "1-2 are copied from it, 3-4 recomputed: each step logged once; 4 optimiser steps and final weights equal to an "
     "uninterrupted run.")),
    ("SIGKILL of the synthesis stage after its first shard", "test_reliability_faults",
     ("Resumes after shard 1 (log: `synthesize: resuming after shard 0 …`); the same rows, in the same order, and the "
     "same number of generated samples as an uninterrupted run.")),
    ("SIGKILL of the pipeline flow process during an SFT stage (general_sft after step 3, checkpoint at 2)",
     "test_reliability_faults", ("The rerun skips the finished stages (r1_zero, synthesize: `reused (unchanged since run …)`) "
     "and resumes general_sft from `checkpoint-2`; 6 steps, weights equal to an uninterrupted run; "
     "a third run reuses all three.")),
    ("An exception inside a stage (any crash the process survives), `retries=1`", "test_reliability_faults",
     ("Prefect retries the task; the retry resumes from the last checkpoint exactly as a rerun does (new MLflow run, "
     "the failed one keeps status FAILED).")),
    ("A kill while a checkpoint is written", "test_reliability_writes",
     ("Only `checkpoint-N.tmp` (no `trainer_state.json`) is left; it is never resumed from; the resume takes the last "
     "complete checkpoint and replaces the stale folder.")),
    ("A kill while a synthesis shard is written", "test_reliability_writes",
     "`shard-0000N.tmp` is removed on resume and that shard is generated again."),
    ("NaN/inf loss or gradient on one step", "test_reliability_numerics",
     ("The optimiser update is skipped (weights, optimiser and LR schedule untouched), counted in the `skipped_steps` "
     "metric (`sft/skipped_steps` in SFT); training goes on.")),
    ("NaN/inf on `max_bad_steps` (default 3) steps in a row", "test_reliability_numerics",
     ("A checkpoint of the last finite weights is saved, then `NonFiniteError: GRPO steps 2-3: 2 steps in a row had a "
     "NaN/inf loss or gradient (max_bad_steps=2); their updates were skipped (2 in all) and the run stopped. "
     "Checkpoint of the last finite weights: …/checkpoint-3. Lower the learning rate, …`")),
    ("NaN gradients on one rank only (DeepSpeed ZeRO-2/3, 2 ranks)", "test_grpo_distributed",
     ("Every rank skips the same updates (DeepSpeed's all-reduced overflow check), weights stay equal on all ranks, and "
     "all ranks stop together with NonFiniteError.")),
    ("Ctrl-C during a GRPO stage of `r1 pipeline` (SIGINT to the terminal's process group), after a checkpoint",
     "test_interrupts", ("Stops within 10 s (about 1 s here) and prints one line, `interrupted: stage r1_zero stopped, "
     "MLflow run <id> marked KILLED; its work dir runs/r1_zero/<key> is kept and a rerun resumes from its last "
     "checkpoint`; exit 130. The stage's and the pipeline's MLflow runs are KILLED, the Prefect task and flow runs "
     "Cancelled; the rerun reuses the finished stages and resumes the stage from that checkpoint.")),
    (("SIGTERM to a stage's own process (`python -m stages.entry`: what torchrun, Slurm and Kubernetes send), or "
      "SIGINT to `r1 stage` started with SIGINT ignored"), "test_interrupts",
     "The same one line and exit 130; the stage's MLflow run is KILLED."),
    ("Our own error in a stage's process under a launcher (e.g. a refused input)", "test_interrupts",
     ("One message on stderr, exit 2, no traceback; the launcher's error shows that message. An unexpected error: a "
     "short line and the file holding its traceback (also torchrun's `error.json`), exit 1.")),
    ("A stage whose estimated training memory exceeds the machine's (GPU memory, else RAM)", "test_memory_estimate",
     ("Refused at preflight, before any model loads: `r1_zero: estimated training memory 6.4 MiB per process: model "
     "states 2.7 MiB (202,048 parameters, ZeRO stage 0 over 1 process(es)), activations 3.3 MiB (micro-batch 8 × 100 "
     "tokens), logits 0.4 MiB; more than the 5.7 MiB of GPU memory of …: lower r1_zero.grpo.micro_batch_size, set "
     "r1_zero.grpo.gradient_checkpointing: true, or shard the model states with DeepSpeed ZeRO stage 2/3 …`; above "
     "80% of it, a warning.")),
    ("Model output run by a reward (`code_tests`): infinite loop, memory bomb, socket, fork, file write",
     "test_rewards_code", ("Scored 0 (each in a subprocess with CPU, memory, file-size and wall-time limits and no "
     "network); the trainer is not affected.")),
]


def _clean(msg: str, ws: Path) -> str:
    """The message as shown, minus what differs between machines and runs (temporary folders, the checkout, pids)."""
    msg = msg.replace(str(ws), "<tmp>").replace(str(README.parent) + "/", "")
    msg = re.sub(r"pid \d+", "pid <pid>", " ".join(msg.split()))
    return msg.replace("|", "\\|")


def tables(ws: Path) -> str:
    lines = ["| bad input | refused by | what the user sees |", "| --- | --- | --- |"]
    for case in REFUSALS:
        if case.name not in SEEN:
            folder = ws / case.name
            folder.mkdir(parents=True, exist_ok=True)
            refusal_message(case, folder)
        msg = SEEN[case.name]
        lines.append(f"| {case.bad_input} | {case.refused_by} | `` {msg} `` |")  # double backticks: it may hold `
    lines += ["", "| fault | test | what happens |", "| --- | --- | --- |"]
    lines += [f"| {what} | `tests/{test}.py` | {seen} |" for what, test, seen in FAULTS]
    return "\n".join(lines)


def readme_block() -> str | None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def test_readme_tables_match_the_tests(tmp_path):
    got = tables(tmp_path)
    assert readme_block() == got, ("README's reliability tables are out of date: regenerate them with "
                                   "`python -m tests.test_reliability_refusals --write`")


if __name__ == "__main__":  # print (or --write into README) the tables
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        block = tables(Path(d))
    if "--write" in sys.argv:
        text = README.read_text()
        text = text[:text.index(BEGIN) + len(BEGIN)] + "\n" + block + "\n" + text[text.index(END):]
        README.write_text(text)
    else:
        print(block)
