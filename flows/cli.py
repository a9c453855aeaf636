"""`r1`: the command line of the R1 pipeline.

Every command takes a recipe: a preset name (`tiny`, `qwen2.5-7b`) or a YAML file, plus `--set key=value` overrides
(dotted keys, YAML values). Recipes are validated before anything heavy is imported or loaded.
"""

from __future__ import annotations

import functools
import gc
import json
import signal
import sys
from pathlib import Path

import click
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stages.core import console as r1_console
from stages.core import errors

app = typer.Typer(
    help="Train reasoning models the DeepSeek-R1 way: base model -> R1-Zero -> cold-start SFT -> reasoning RL -> "
    "rejection sampling -> general SFT -> preference RL -> distillation, orchestrated by Prefect, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

# Each command imports the stages and flows it runs inside its function: `r1 --help` and `r1 validate` must start fast.

RECIPE_HELP = "recipe preset name (see `r1 presets`) or path to a YAML recipe"
SET_HELP = "override a recipe value, e.g. --set eval.num_prompts=32 (repeatable)"


DEBUG = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show full tracebacks instead of short messages")):
    DEBUG["on"] = debug


def _fail(message: str, code: int = 2):
    """Print an error (markup-safe: a value may hold `[` `]`) and exit."""
    console.print(escape(message), style="red", highlight=False)
    raise typer.Exit(code)


def _handled(command):
    """Every command ends the same way (stages/core/errors.py): the tool's own errors (bad input, refusals) print one
    message and exit 2; anything else prints a short line and the file holding its traceback, and exits 1; Ctrl-C or
    SIGTERM prints one line and exits 130. `r1 --debug ...` shows tracebacks instead."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except BaseException as e:  # the one place every error reaches the user
            if DEBUG["on"] or not (isinstance(e, Exception) or errors.is_interrupt(e)):
                raise
            code, message = errors.outcome(e)
            if code == errors.EXIT_INTERRUPTED:
                errors.handled()
                sys.stdout.flush()
                console.print(escape(message), style="yellow", highlight=False, soft_wrap=True)
                gc.freeze()  # the exit's last garbage collection skips them: seconds, with torch/Prefect/MLflow loaded
                raise typer.Exit(code) from None
            _fail(message, code)

    return run


def _overrides(sets: list[str] | None) -> dict:
    # lazy: fast `r1 --help` (see top)
    from stages.core.recipe import parse_sets

    return parse_sets(sets)


def _recipe(recipe: str, sets: list[str] | None):
    # lazy: fast `r1 --help` (see top)
    from stages.core.recipe import load_recipe

    return load_recipe(recipe, _overrides(sets))


QUIET_HELP = "print only warnings and the stage start/end lines"
VERBOSE_HELP = "also our DEBUG lines (third-party libraries stay at warnings)"


def _logging(verbose: bool, quiet: bool = False) -> None:
    if verbose and quiet:
        raise typer.BadParameter("--quiet and --verbose: pick one")
    r1_console.setup("verbose" if verbose else "quiet" if quiet else "normal")


@app.command()
@_handled
def presets() -> None:
    """List the recipe presets shipped with the package."""
    # lazy: fast `r1 --help` (see top)
    from stages.core.recipe import PRESET_DIR
    from stages.core.recipe import presets as names

    for n in names():
        first = (PRESET_DIR / f"{n}.yaml").read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{n}[/bold]  {first}")


@app.command()
@_handled
def validate(recipe: str = typer.Argument(..., help=RECIPE_HELP),
             set: list[str] = typer.Option(None, "--set", help=SET_HELP),
             show: bool = typer.Option(False, help="print the full validated recipe as YAML")) -> None:
    """Validate a recipe without running anything; a bad value is reported with its field."""
    cfg = _recipe(recipe, set)
    console.print(f"recipe {cfg.name!r} is valid", style="green", highlight=False)
    if show:
        typer.echo(yaml.safe_dump(cfg.model_dump(), sort_keys=False))  # plain: rich would wrap lines, eat [..]


@app.command("base-model")
@_handled
def base_model_cmd(recipe: str = typer.Option("tiny", help=RECIPE_HELP),
                   out: Path = typer.Option(Path("runs/base_model"), help="directory to save the model to"),
                   set: list[str] = typer.Option(None, "--set", help=SET_HELP),
                   verbose: bool = False) -> None:
    """Build and pretrain the tiny base model into a local directory (no MLflow run). For a tracked build use
    `r1 stage base_model`."""
    _logging(verbose)
    cfg = _recipe(recipe, set)
    if cfg.base_model.source != "build":
        _fail("base_model.source is 'pretrained': nothing to build")
    # lazy: fast `r1 --help` (see top)
    from stages.base_model import build_base_model

    res = build_base_model(cfg, out)
    console.print(f"saved {res.num_parameters:,}-parameter model to {res.path} ({res.steps} steps, "
                  f"loss {res.final_loss:.3f}, {res.seconds:.0f} s)")


@app.command()
@_handled
def evaluate(model: str = typer.Argument(..., help="model directory or URI (runs:/<id>/model, models:/name@alias)"),
             recipe: str = typer.Option("tiny", help=RECIPE_HELP),
             set: list[str] = typer.Option(None, "--set", help=SET_HELP),
             benchmark: list[str] = typer.Option(None, "--benchmark", help="a JSON-lines benchmark file (aime/math500 "
                                                 "shape by its name, else question/answer) or aime-fixture, "
                                                 "math500-fixture (repeatable); only these are evaluated"),
             samples: int = typer.Option(None, "--samples", min=1, max=1024, help="n samples per benchmark problem "
                                         "(default: the benchmark's, else eval.samples_per_prompt)"),
             verbose: bool = False) -> None:
    """Evaluate a model on the recipe's held-out prompts (pass@1 over k samples, greedy accuracy, format rate, language
    consistency) and its eval.benchmarks (pass@1 over n samples, cons@n, pass@k), at the recipe's temperature and top-p.
    With --benchmark, only the benchmarks given. Prints the metrics; writes nothing."""
    _logging(verbose)
    cfg = _recipe(recipe, set)
    # lazy: fast `r1 --help` (see top)
    from stages.core.benchmarks import cli_benchmark, evaluate_benchmark, load_benchmark
    from stages.core.evaluate import evaluate as run_eval
    from stages.core.heldout import heldout_problems
    from stages.core.models import load_model_and_tokenizer

    benches = [cli_benchmark(b, samples) for b in benchmark] if benchmark else [
        b.model_copy(update={"samples": samples or b.samples}) for b in cfg.eval.benchmarks]
    for b in benches:
        if b.pass_k and b.pass_k > (b.samples or cfg.eval.samples_per_prompt):
            _fail(f"benchmark {b.name}: pass_k {b.pass_k} is more than the {b.samples} samples drawn (--samples)")
    sets = [(b, load_benchmark(b)) for b in benches]  # a bad file is refused before the model loads
    m, tok = load_model_and_tokenizer(model, trust_remote_code=cfg.base_model.trust_remote_code)
    if not benchmark:
        res = run_eval(m, tok, heldout_problems(cfg), cfg.eval, cfg.prompt, progress=True)
        table = Table("metric", "value", title=f"held-out evaluation of {model}")
        for k, v in res.metrics(prefix="").items():
            table.add_row(k, f"{v:.3f}")
        console.print(table)
    if sets:
        table = Table("benchmark", "problems", "n", "pass@1", "cons@n", "k", "pass@k", title=f"benchmarks of {model}")
        for bench, problems in sets:
            r = evaluate_benchmark(m, tok, problems, bench, cfg.eval, cfg.prompt, progress=True)
            table.add_row(bench.name, str(r.num_problems), str(r.samples), f"{r.pass_at_1:.3f}", f"{r.cons_at_k:.3f}",
                          str(r.pass_k), f"{r.pass_at_k:.3f}")
        console.print(table)


@app.command()
@_handled
def stage(name: str = typer.Argument(..., help="stage name, e.g. r1_zero (see README for the chain)"),
          recipe: str = typer.Option("tiny", "--config", "--recipe", help=RECIPE_HELP),
          input_model: str = typer.Option(None, "--input-model", help="model URI (runs:/<id>/model, a path, ...)"),
          input_data: str = typer.Option(None, "--input-data", help="data URI (runs:/<id>/data, a path, ...)"),
          inputs: list[str] = typer.Option(None, "--input", help="other inputs as KEY=URI (repeatable), e.g. "
                                           "teacher=runs:/<id>/model"),
          set: list[str] = typer.Option(None, "--set", help=SET_HELP),
          quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
          verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP)) -> None:
    """Run one stage alone as its own MLflow run (no Prefect), through the recipe's cluster launcher as the pipeline
    does (in this process for `local`; torchrun, deepspeed, Slurm, Kubernetes otherwise). Inputs not given resolve to
    the newest finished run of the upstream stage in the recipe's MLflow experiment."""
    _logging(verbose, quiet)
    errors.raise_on_signals()
    # lazy: fast `r1 --help` (see top)
    from flows.launch import LaunchSpec, launch_stage
    from stages.core.order import check_stages, inputs_of

    try:
        check_stages([name])
    except ValueError as e:
        _fail(str(e))
    cfg = _recipe(recipe, set)
    given = {"model": input_model, "data": input_data}
    known = sorted(inputs_of(cfg, name))
    for item in inputs or []:
        if "=" not in item:
            _fail(f"--input {item!r}: expected KEY=URI")
        key, uri = item.split("=", 1)
        if key.strip() not in known:
            _fail(f"--input {key.strip()!r}: stage {name} takes no such input; its inputs: {known}")
        given[key.strip()] = uri.strip()
    for key in ("model", "data"):
        if given[key] and key not in known:
            _fail(f"--input-{key}: stage {name} takes no {key} input; its inputs: {known}")
    out = launch_stage(name, recipe, _overrides(set), spec=LaunchSpec.from_cluster(cfg.cluster),
                       inputs={k: v for k, v in given.items() if v})
    console.print_json(json.dumps(out))


@app.command()
@_handled
def pipeline(recipe: str = typer.Option("tiny", help=RECIPE_HELP),
             stages: list[str] = typer.Option(None, "--stage", help="run only these stages (repeatable)"),
             set: list[str] = typer.Option(None, "--set", help=SET_HELP),
             force: list[str] = typer.Option(None, "--force", help="rerun this stage even if unchanged (repeatable)"),
             quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
             verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP)) -> None:
    """Run the pipeline as a Prefect flow (a temporary local Prefect server if none is configured) with one MLflow
    parent run and a nested run per stage. Stages whose config and inputs are unchanged since a finished run are
    skipped and their outputs reused (--force NAME reruns one). Results: `mlflow ui --backend-store-uri
    sqlite:///mlflow.db`."""
    _logging(verbose, quiet)
    errors.raise_on_signals()
    cfg = _recipe(recipe, set)  # validate before Prefect starts
    # lazy: fast `r1 --help` (see top)
    from flows.pipeline import configure_local_prefect
    from stages.core.order import check_stages
    from stages.core.preflight import preflight
    from stages.registry import runnable

    try:
        check_stages(force or [])
        preflight(cfg, stages or list(runnable()))  # before Prefect starts: every check that needs no model
    except ValueError as e:
        _fail(str(e))
    configure_local_prefect()
    # lazy: fast `r1 --help` (see top)
    from prefect.exceptions import CancelledRun

    from flows.pipeline import r1_pipeline  # lazy: fast `r1 --help` (see top)

    try:
        result = r1_pipeline(recipe=recipe, stages=stages or None, overrides=_overrides(set), force=force or None)
    except CancelledRun as e:  # Ctrl-C or SIGTERM: the flow run ended Cancelled, with the line to show
        raise errors.Interrupted(str(e)) from None
    console.print_json(json.dumps(result))
    console.print(f"MLflow: `mlflow ui --backend-store-uri {cfg.tracking.uri}` then open experiment "
                  f"{cfg.tracking.experiment!r}")


@app.command()
@_handled
def up(recipe: str = typer.Option("tiny", help=RECIPE_HELP),
       set: list[str] = typer.Option(None, "--set", help=SET_HELP),
       host: str = typer.Option("127.0.0.1", help="interface to bind; anything but loopback exposes both servers "
                                "without authentication"),
       prefect_port: int = typer.Option(4200, help="Prefect server port"),
       mlflow_port: int = typer.Option(5000, help="MLflow UI port"),
       log_dir: Path = typer.Option(Path(".r1/logs"), help="where the servers' logs go")) -> None:
    """Start a local Prefect server (UI, API, scheduler) and the MLflow UI over the recipe's tracking store, both on
    127.0.0.1, until Ctrl-C. Then `export PREFECT_API_URL=http://127.0.0.1:4200/api` and run `r1 serve` or
    `r1 pipeline` in another terminal."""
    cfg = _recipe(recipe, set)
    # lazy: fast `r1 --help` (see top)
    from flows.servers import ServerError, local_servers, start, stop, wait_ready, watch

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]binding to {escape(host)}: anyone who can reach it can use both servers (no "
                      "authentication)[/yellow]")
    servers = local_servers(cfg.tracking.uri, host, prefect_port, mlflow_port,
                            cfg.tracking.artifact_location or "./mlartifacts")
    errors.raise_on_signals()  # before any server starts: Ctrl-C while they boot stops them too
    procs = start(servers, log_dir)
    code = 0
    try:
        wait_ready(servers, procs, log_dir)
        table = Table("server", "open", "log", title="r1 up: servers ready (Ctrl-C stops them)")
        for srv in servers:
            table.add_row(srv.name, srv.url, str(log_dir / srv.log_name))
        console.print(table)
        console.print(f"In another terminal:\n  export PREFECT_API_URL=http://{host}:{prefect_port}/api\n"
                      f"  r1 serve --recipe {recipe}     # deployments for the Prefect UI\n"
                      f"  r1 pipeline --recipe {recipe}  # or run the chain now", highlight=False)
        if not cfg.tracking.uri.startswith("http"):
            console.print(f"MLflow UI reads {cfg.tracking.uri}: experiment {cfg.tracking.experiment!r}",
                          highlight=False)
        name = watch(servers, procs)
        console.print(f"[red]{name} stopped (see its log); stopping the others[/red]")
        code = 1
    except ServerError as e:
        console.print(escape(str(e)), style="red", highlight=False)
        code = 1
    except KeyboardInterrupt:
        errors.handled()
        console.print("stopping the servers")
    finally:
        sys.stdout.flush()  # a log file is block-buffered: say it before the (slow) shutdown
        stop(procs)
    raise typer.Exit(code)


@app.command()
@_handled
def serve(recipe: str = typer.Option("tiny", help=RECIPE_HELP),
          set: list[str] = typer.Option(None, "--set", help=SET_HELP),
          limit: int = typer.Option(None, help="at most this many flow runs at once (default: no limit)"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
          verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP)) -> None:
    """Register the pipeline and every stage as deployments named after the recipe (r1-pipeline/tiny,
    r1-reasoning-rl/tiny, ...) with the recipe's cron schedules, on the Prefect server at PREFECT_API_URL (see
    `r1 up`), and run what the UI, the API or a schedule triggers until Ctrl-C. Flow runs start in this folder."""
    _logging(verbose, quiet)
    cfg = _recipe(recipe, set)
    # lazy: fast `r1 --help` (see top)
    from flows.deployments import ServeError, build_deployments, check_server, serve_until_stopped
    from stages.core.recipe import RecipeError

    try:
        url = check_server()
        deployments = build_deployments(cfg, recipe, _overrides(set))
    except (ServeError, RecipeError) as e:
        _fail(str(e))
    for s in cfg.schedules:
        console.print(f"schedule: {s.flow} at '{s.cron}' ({s.timezone}){'' if s.active else ', paused'}",
                      highlight=False)

    def ready() -> None:  # once registered: each name, as a user (and `run_deployment`) gives it
        typer.echo(f"serving {len(deployments)} deployments on {url}; open the Prefect UI, Deployments, then "
                   f"r1-pipeline/{cfg.name} -> Run")
        for d in deployments:
            typer.echo(f"  {d.flow_name}/{d.name}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored; asyncio's
    serve_until_stopped(deployments, limit, on_ready=ready)       # runner then stops Prefect's runner cleanly


@app.command()
@_handled
def compare(recipe: str = typer.Option("tiny", help=RECIPE_HELP),
            stage: str = typer.Option(None, help="only runs of this stage"),
            pipeline_run: str = typer.Option(None, "--pipeline-run", help="only the stages of this pipeline run (full id)"),
            limit: int = typer.Option(20, min=1, help="newest N runs"),
            as_json: bool = typer.Option(False, "--json", help="JSON list, full names and precision"),
            as_csv: bool = typer.Option(False, "--csv", help="CSV with a header row, full names and precision"),
            set: list[str] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Compare stage runs: held-out pass@1, greedy accuracy, format rate, language consistency, completion length
    (from the recipe's MLflow store), newest first; one block per run when the terminal is too narrow for the table.
    Exit 1 when no run matches, 2 when the store, stage or pipeline run does not exist. For plots, select the runs
    in the MLflow UI and press Compare."""
    if as_json and as_csv:
        typer.echo("--json and --csv: pick one", err=True)
        raise typer.Exit(2)
    cfg = _recipe(recipe, set)
    # lazy: fast `r1 --help` (see top)
    from flows.compare import CompareError, compare_rows, print_rows, to_csv, to_json

    try:
        rows = compare_rows(cfg, stage, pipeline_run, limit)
    except CompareError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if as_json or as_csv:
        typer.echo(to_json(rows) if as_json else to_csv(rows), nl=as_json)
    elif rows:
        print_rows(Console(highlight=False), rows)  # a new Console: COLUMNS as it is now
    else:
        typer.echo(f"no stage runs in experiment {cfg.tracking.experiment!r} at {cfg.tracking.uri}")
    if not rows:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    sys.exit(app())
