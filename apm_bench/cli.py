"""`apm`: the command line. Heavy libraries are imported inside commands, so `apm --help` is quick."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apm_bench.errors import ApmError, UnknownNameError
from apm_bench.inputs import check_output_dir, check_output_file

if TYPE_CHECKING:
    from apm_bench.run.config import RunConfig

PROCESS_START = time.perf_counter()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="apm-bench: implicit style personalization benchmark.",
)
console = Console()


def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    """Accept both `--method a --method b` and `--method a,b`."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _worlds(value: Optional[str]) -> Optional[list[int]]:
    """`--worlds 3` means seeds 0, 1, 2; `--worlds 4,7` means exactly those seeds."""
    if value is None:
        return None
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        count = int(value)
    except ValueError:
        raise ApmError(f"--worlds takes a count or a comma list of seeds, got {value!r}") from None
    if count < 1:
        raise ApmError("--worlds needs at least one world")
    return list(range(count))


def _run_options(
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="method(s) to evaluate; baseline, oracle and prior always run"),
    model: Optional[str] = typer.Option(None, help="generator: alias, hub id or local path (default sim-large)"),
    backend: Optional[str] = typer.Option(None, help="engine for --model: sim, hf, vllm or openai (default: the alias's)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server for --backend openai"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="sim-judge (default) or a model for the LLM judge"),
    judge_backend: Optional[str] = typer.Option(None, "--judge-backend", help="engine of the judge model"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible server of the judge"),
    judge_weighted: Optional[bool] = typer.Option(None, "--judge-weighted/--judge-sampled", help="probability-weighted judge scores"),
    judge_reasoning_effort: Optional[str] = typer.Option(None, "--judge-reasoning-effort", help="low, medium or high (gpt-oss judges)"),
    judge_max_tokens: Optional[int] = typer.Option(None, "--judge-max-tokens", help="answer budget of the LLM judge (raise for reasoning judges)"),
    judge_temperature: Optional[float] = typer.Option(None, "--judge-temperature", help="LLM judge sampling temperature (seeded; default 0)"),
    candidate_model: Optional[str] = typer.Option(None, "--candidate-model", help="model writing the 2P candidates (default sim-large)"),
    writer_model: Optional[str] = typer.Option(None, "--writer-model", help="'sim' or a model that rewrites prompts into histories"),
    roles: Optional[str] = typer.Option(None, "--roles", help="fill unset roles: 'same' (all on the generator) or 'paper' (gpt-oss-120b judges and rewrites)"),
    allow_simulated_roles: Optional[bool] = typer.Option(None, "--allow-simulated-roles", help="let a real generator run with simulated roles"),
    engine_budget: Optional[int] = typer.Option(None, "--engine-budget", help="vllm engines loaded at once (default 1)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="answer budget of candidates and responses (default 1024)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="call cache file (default .apm-cache/calls.sqlite)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not read or write the call cache"),
    worlds: Optional[str] = typer.Option(None, help="number of world seeds, or a comma list of seeds (default 3)"),
    users: Optional[int] = typer.Option(None, help="users in the population (default 400)"),
    n_attr: Optional[int] = typer.Option(None, "--n-attr", help="active attributes per user: 1 or 2"),
    pool: Optional[int] = typer.Option(None, help="pool size k: the catalog's pool of k principles and k attributes (2, 4, 6, 8: the paper's; 10: default)"),
    mapping: Optional[str] = typer.Option(None, help="world matrix kind: permutation or dense"),
    n_perm: Optional[int] = typer.Option(None, "--n-perm", help="overlaid signed permutations in C"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="'paper': the APM authors' protocol for every option left unset (docs/protocol.md)"),
    max_targets: Optional[int] = typer.Option(None, "--max-targets", help="score only the k principles with the largest |r| (the paper: k = n_attr)"),
    history_len: Optional[int] = typer.Option(None, "--history-len", help="past messages per user (default 8)"),
    train_users: Optional[int] = typer.Option(None, "--train-users", help="fit on at most N training users (a nested, stratified subset; test users unchanged)"),
    label_strategy: Optional[list[str]] = typer.Option(None, "--label-strategy", help="routing labels: abs, abs_two_sided, margin, regression or all"),
    control: Optional[str] = typer.Option(None, help="no-history or shuffled-history"),
    data_seed: Optional[int] = typer.Option(None, "--data-seed", help="seed of the user population and split (default 0)"),
    balanced: Optional[bool] = typer.Option(None, "--balanced/--iid-attributes", help="population balanced by design (default) or drawn user by user"),
    split_per_world: Optional[bool] = typer.Option(None, "--split-per-world/--fixed-split", help="a fresh stratified split in every world (default), or one per data seed"),
    principles: Optional[Path] = typer.Option(None, "--principles", help="folder with principles.yaml (and antonyms.yaml)"),
    personas: Optional[Path] = typer.Option(None, "--personas", help="folder with attributes.yaml and seeds.yaml"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="neutral prompt file (JSONL or Parquet)"),
    test_prompts: Optional[Path] = typer.Option(None, "--test-prompts", help="prompts for test users only (e.g. UltraChat test_sft as JSONL or Parquet)"),
    conversations: Optional[Path] = typer.Option(None, "--conversations", help="users in the APM reference JSONL format"),
    test_conversations: Optional[Path] = typer.Option(None, "--test-conversations", help="the authors' test file: every world's test users"),
    summaries: Optional[Path] = typer.Option(None, "--summaries", help="popi: reuse summaries from a run's samples.parquet (or JSONL)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of run options (CLI options win)"),
    out: Optional[Path] = typer.Option(None, help="where run folders go (default results/runs)"),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="φ's engine: onnx-int8 (default where onnxruntime is installed) or torch"),
) -> None:
    """The options of every command that runs the benchmark (`apm run`, `apm curve`), declared once."""


def _with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` every option of `_run_options` after its own; it gets their values as one dict,
    `options`, so a new run option reaches every such command at once."""
    shared = inspect.signature(_run_options, eval_str=True).parameters
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "options"]

    @functools.wraps(command)
    def wrapper(**values: Any) -> None:
        command(options={name: values.pop(name) for name in shared}, **values)

    parameters = own + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared.values()]
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


#: run options named otherwise than their RunConfig field, and those that are no field
_FIELD_OF_OPTION = {"method": "methods", "balanced": "balanced_population", "principles": "principles_dir",
                    "personas": "personas_dir", "prompts": "prompts_file", "test_prompts": "test_prompts_file",
                    "conversations": "conversations_file", "test_conversations": "test_conversations_file"}
_NOT_FIELDS = ("config", "no_cache", "summaries")


def _run_config(options: dict[str, Any]) -> RunConfig:
    """The RunConfig of a command's run options: defaults ← --config file ← the options given."""
    from apm_bench.run.config import load_config

    parsed = {**options, "method": _split(options["method"]), "label_strategy": _split(options["label_strategy"]),
              "worlds": _worlds(options["worlds"])}
    overrides = {_FIELD_OF_OPTION.get(name, name): value for name, value in parsed.items() if name not in _NOT_FIELDS}
    run_config = load_config(options["config"], overrides)
    if options["no_cache"]:
        run_config = run_config.model_copy(update={"cache": None})
    if options["summaries"] is not None:
        popi = {**run_config.method_options.get("popi", {}), "summaries_file": options["summaries"]}
        run_config = run_config.model_copy(update={"method_options": {**run_config.method_options, "popi": popi}})
    return run_config


@app.command()
@_with_run_options
def run(options: dict[str, Any]) -> None:
    """Run the benchmark and write results/runs/<run-id>/."""
    run_config = _run_config(options)

    from apm_bench.reporting.results import write_run
    from apm_bench.run.runner import run_benchmark

    with _progress_bar(40) as bar:
        task = bar.add_task("preparing", total=None)

        def show(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        result = run_benchmark(run_config, progress=show)
    folder = write_run(result, time.perf_counter() - PROCESS_START)
    _print_summary(result.metrics)
    console.print(f"wrote [bold]{folder}[/bold] in {time.perf_counter() - PROCESS_START:.1f} s")


def _progress_bar(width: int):  # type: ignore[no-untyped-def]
    """A transient rich progress display: spinner, stage text, bar, count, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn(f"{{task.description:<{width}}}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


def _print_summary(metrics) -> None:  # type: ignore[no-untyped-def]
    table = Table(title="Δ score vs baseline, pooled over worlds")
    for column in ("method", "n", "Δ score", "95 % CI", "win/tie/loss", "gain"):
        table.add_column(column)
    for m in metrics:
        if m.world != "pooled" or m.method == "baseline":
            continue
        table.add_row(
            escape(m.method),
            str(m.n_users),
            f"{m.delta:+.3f}",
            f"[{m.ci_low:+.3f}, {m.ci_high:+.3f}]",
            f"{m.win:.2f}/{m.tie:.2f}/{m.loss:.2f}",
            "–" if m.gain is None else f"{m.gain:.2f}",
        )
    console.print(table)


@app.command()
def methods() -> None:
    """List registered personalization methods."""
    from apm_bench.methods import METHODS

    table = Table(title="methods")
    table.add_column("name")
    table.add_column("description")
    for name in METHODS.names():
        table.add_row(name, METHODS.get(name).description)
    console.print(table)


@app.command()
def models() -> None:
    """List model aliases and the backend that runs each."""
    from apm_bench.backends import model_registry

    registry = model_registry()
    table = Table(title="models")
    for column in ("alias", "backend", "description"):
        table.add_column(column)
    for name in registry.names():
        spec = registry.get(name)
        table.add_row(name, spec.backend, spec.description)
    console.print(table)


def _fail(message: str, code: int) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(code)


@app.command("serve-sim")
def serve_sim(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, min=1, max=65535, help="port to listen on"),
    judge_noise: float = typer.Option(0.75, "--judge-noise", help="rating noise of the sim-judge model"),
    judge_bias: float = typer.Option(0.0, "--judge-bias", help="added to every sim-judge score"),
) -> None:
    """Serve the simulator over an OpenAI-compatible API (/v1/models, /v1/chat/completions)."""
    from apm_bench.judging.sim_judge import SimJudgeConfig
    from apm_bench.serve import run_server

    run_server(host=host, port=port, judge_config=SimJudgeConfig(noise=judge_noise, bias=judge_bias))


judge_app = typer.Typer(no_args_is_help=True, help="Judge diagnostics (the paper's judge study).")
app.add_typer(judge_app, name="judge")


@judge_app.command("analyze")
def judge_analyze(
    directory: Path = typer.Argument(..., help="folder of <judge>.npz score files"),
    out: Optional[Path] = typer.Option(None, help="where to write table.csv and the plots (default: DIRECTORY/analysis)"),
) -> None:
    """Antonym-consistency table, correlation heatmap and balance chart for judge score files."""
    from apm_bench.judging.analysis import diagnostics_table, load_judge_scores, write_diagnostics

    target = check_output_dir(out or Path(directory) / "analysis", "--out")
    judges = load_judge_scores(directory)
    paths = write_diagnostics(judges, target)
    _print_judge_table(diagnostics_table(judges))
    for path in paths.values():
        console.print(f"wrote {path}")


@judge_app.command("calibrate")
def judge_calibrate(
    judge_model: str = typer.Option("sim-judge", "--judge-model", help="sim-judge or a model for the LLM judge"),
    judge_backend: Optional[str] = typer.Option(None, "--judge-backend", help="engine of the judge model"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible server of the judge"),
    judge_weighted: bool = typer.Option(False, "--judge-weighted", help="probability-weighted scores"),
    judge_bias: float = typer.Option(0.0, "--judge-bias", help="sim-judge only: add this to every score"),
    judge_noise: float = typer.Option(0.75, "--judge-noise", help="sim-judge only: rating noise"),
    model: str = typer.Option("sim-large", help="model that writes the responses to rate"),
    per_pair: int = typer.Option(160, "--per-pair", min=2, help="responses per antonym pair (the paper: 160)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of prompts, instructions and sampling"),
    out: Path = typer.Option(Path("results/judges"), help="folder for the score file and the analysis"),
) -> None:
    """Have a judge rate both words of every antonym pair, save the scores, then analyse them."""
    check_output_dir(out, "--out")
    from apm_bench.judging.calibration import calibrate

    path, dropped = calibrate(
        judge_model, judge_backend, judge_url, judge_weighted, judge_bias, judge_noise, model, per_pair, seed, out
    )
    console.print(f"wrote {path}" + (f" ({dropped} responses dropped for failed ratings)" if dropped else ""))
    judge_analyze(out, out / "analysis")


@judge_app.command("agreement")
def judge_agreement(
    judge_model: str = typer.Option(..., "--judge-model", help="the LLM judge to compare with sim-judge (e.g. apm-tiny-judge)"),
    judge_backend: Optional[str] = typer.Option(None, "--judge-backend", help="engine of the judge model"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible server of the judge"),
    judge_weighted: bool = typer.Option(False, "--judge-weighted", help="probability-weighted scores (the expected "
                                                                       "score over 1..10), as runs rate with --judge-weighted"),
    model: str = typer.Option("sim-large", help="model that writes the answers to rate"),
    answers: int = typer.Option(300, min=10, help="answers to rate, each on its instructed principle and a random one"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of prompts, instructions and sampling"),
    out: Path = typer.Option(Path("results/judges"), help="folder for <judge>-agreement.md, .json and .csv"),
) -> None:
    """Rate the same answers with an LLM judge and with sim-judge: correlation, differences, means per side.
    The answers are to prompts no apm-tiny model was trained on."""
    from apm_bench.backends import load_backend, resolve_model
    from apm_bench.judging.agreement import agreement_summary, rated_pairs, write_agreement
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
    from apm_bench.judging.sim_judge import SimJudge
    from apm_bench.tiny.corpus import default_catalog, held_out_prompts

    resolve_model(model), resolve_model(judge_model, judge_backend)  # an unknown name stops here, before any work
    target = check_output_dir(out, "--out")
    catalog = default_catalog()
    writer = load_backend(model, catalog, seed=seed)
    try:
        engine = load_backend(judge_model, catalog, seed=seed, backend=judge_backend,
                              options={"base_url": judge_url} if judge_url else {})
        try:
            judge = LLMJudge(engine, catalog.principles, LLMJudgeConfig(weighted=judge_weighted))
            pairs = rated_pairs(catalog, held_out_prompts()[1], writer, judge, SimJudge(catalog.principles), answers, seed)
        finally:
            engine.close()
    finally:
        writer.close()
    paths = write_agreement(pairs, agreement_summary(pairs), target, judge_model, "sim-judge", judge_weighted)
    console.print(paths[-1].read_text(encoding="utf-8"))
    for path in paths:
        console.print(f"wrote {path}")


def _print_judge_table(frame) -> None:  # type: ignore[no-untyped-def]
    overall = frame[frame["pair"] == "overall"]
    table = Table(title="judge balance (overall): mean |s⁺ + s⁻ − 11|, lower is better")
    for column in ("judge", "n", "mean_sum", "std_sum", "mean_l1_from_11"):
        table.add_column(column)
    for _, row in overall.iterrows():
        table.add_row(str(row["judge"]), str(row["n"]), f"{row['mean_sum']:.3f}", f"{row['std_sum']:.3f}", f"{row['mean_l1_from_11']:.3f}")
    console.print(table)


tiny_app = typer.Typer(no_args_is_help=True, help="apm-tiny: a small real model that writes in the benchmark's styles.")
app.add_typer(tiny_app, name="tiny-model")


@tiny_app.command("build")
def tiny_build(
    out: Optional[Path] = typer.Option(None, help="model folder to write (default: the package's own, which the "
                                                  "apm-tiny alias loads)"),
    corpus: Optional[Path] = typer.Option(None, help="corpus JSONL: read where it exists, else recorded and saved there"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the corpus, the weights and the data order"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default: the build's own)"),
) -> None:
    """Record the corpus from the simulator, train the tokenizer and the model, write it with a manifest
    (into the package, where the alias finds it, unless --out says otherwise)."""
    from apm_bench.tiny.build import BuildConfig, build, bundled_folder
    from apm_bench.tiny.corpus import CorpusConfig
    from apm_bench.tiny.training import TrainingConfig

    target = check_output_dir(out or bundled_folder(), "--out")
    if corpus is not None:
        check_output_file(corpus, "--corpus")
    training = TrainingConfig(seed=seed, **({"steps": steps} if steps else {}))
    config = BuildConfig(seed=seed, corpus=CorpusConfig(seed=seed), training=training)
    manifest = build(config, target, corpus, report=console.print)
    console.print(f"wrote {target}: {manifest['parameters']:,} parameters, {manifest['bytes'] / 2**20:.1f} MiB, "
                  f"final loss {manifest['training']['final_loss']}, {manifest['seconds']['total_s'] / 60:.1f} min, "
                  f"sha256 {manifest['checksum']}")


@tiny_app.command("build-judge")
def tiny_build_judge(
    out: Optional[Path] = typer.Option(None, help="model folder to write (default: the package's own, which the "
                                                  "apm-tiny-judge alias loads)"),
    base: Optional[Path] = typer.Option(None, help="apm-tiny folder to start from (default: the shipped one)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the answers, the ratings and the data order"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default: the build's own)"),
) -> None:
    """Fine-tune apm-tiny on LLM-judge requests rated by sim-judge; write apm-tiny-judge with a manifest."""
    from apm_bench.tiny.build import bundled_folder
    from apm_bench.tiny.judge import JUDGE_TRAINING, JudgeBuildConfig, build_judge

    target = check_output_dir(out or bundled_folder("apm-tiny-judge"), "--out")
    training = JUDGE_TRAINING.model_copy(update={"seed": seed, **({"steps": steps} if steps else {})})
    manifest = build_judge(JudgeBuildConfig(seed=seed, training=training), target, base, report=console.print)
    console.print(f"wrote {target}: validation Pearson {manifest['validation']['pearson_before']} → "
                  f"{manifest['validation']['pearson']}, {manifest['seconds']['total_s'] / 60:.1f} min, "
                  f"{manifest['bytes'] / 2**20:.1f} MiB, sha256 {manifest['checksum']}")


@tiny_app.command("verify")
def tiny_verify(folder: Optional[Path] = typer.Argument(None, help="model folder (default: every shipped one)")) -> None:
    """Check a model folder's files against the checksum in its manifest."""
    from apm_bench.tiny.build import SHIPPED, bundled_folder, verify

    for target in [folder] if folder is not None else [bundled_folder(name) for name in SHIPPED]:
        manifest = verify(target)
        console.print(f"{target}: ok, sha256 {manifest['checksum']}")


@tiny_app.command("path")
def tiny_path(name: str = typer.Argument("apm-tiny", help="apm-tiny or apm-tiny-judge")) -> None:
    """Print the folder of a shipped model (for `vllm serve` or any other engine)."""
    from apm_bench.tiny.build import SHIPPED, bundled_folder

    if name not in SHIPPED:
        raise UnknownNameError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    print(bundled_folder(name))


@tiny_app.command("report")
def tiny_report(
    model: str = typer.Option("apm-tiny", help="model to probe (an alias, hub id or path)"),
    backend: Optional[str] = typer.Option(None, help="its engine (default: the alias's own)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="server URL for the openai backend"),
    per_principle: int = typer.Option(20, "--per-principle", min=1, help="prompts per principle and condition"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of prompts and sampling"),
    out: Path = typer.Option(Path("results/apm-tiny"), help="folder for behaviour.md and its CSV files"),
) -> None:
    """Instruction, imitation and summary tables: the judge's score under FOLLOW / none / AVOID, next to sim-large."""
    from apm_bench.tiny.behaviour import BehaviourConfig, behaviour_report

    target = check_output_dir(out, "--out")
    config = BehaviourConfig(prompts_per_principle=per_principle, seed=seed)
    options = {"base_url": base_url} if base_url else {}
    paths = behaviour_report(model, backend, options, config, target, say=console.print)
    console.print((paths[-1]).read_text(encoding="utf-8"))
    for path in paths:
        console.print(f"wrote {path}")


suite_app = typer.Typer(no_args_is_help=True, help="The benchmark suite behind the leaderboard.")
app.add_typer(suite_app, name="suite")


@suite_app.command("run")
def suite_run(
    config: Path = typer.Argument(..., help="suite YAML (e.g. configs/leaderboard.yaml)"),
    only: Optional[str] = typer.Option(None, "--only", help="run just this method (plus baseline, oracle and prior) in every setting"),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="runs at once (default: one per core where every role is simulated, else 1)"),
) -> None:
    """Run every setting of a suite and record the runs; then `apm leaderboard` renders them."""
    from apm_bench.reporting.suite import default_jobs, load_suite, plan_suite, run_suite

    suite = load_suite(config)
    jobs = jobs or default_jobs([c for _, c in plan_suite(suite, only)])
    started = time.perf_counter()
    with _progress_bar(60) as bar:
        settings = bar.add_task("settings", total=None)
        stage = bar.add_task("preparing", total=None)

        def on_setting(name: str, done: int, total: int) -> None:
            bar.update(settings, description=f"setting {name}", completed=done, total=total)

        def show(text: str, done: int, total: int) -> None:
            bar.update(stage, description=text, completed=done, total=total)

        folders = run_suite(suite, only, on_setting, show, jobs=jobs)
    for folder in folders:
        console.print(f"wrote {folder}")
    console.print(f"suite: {len(folders)} runs in {time.perf_counter() - started:.1f} s ({jobs} at a time); "
                  "now run `apm leaderboard`")


@app.command()
def leaderboard(
    runs: Path = typer.Option(Path("results/suite"), help="folder of recorded runs (searched recursively)"),
    out: Path = typer.Option(Path("results"), help="where LEADERBOARD.md, leaderboard.csv and leaderboard.png go"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if the files differ from what the runs give"),
) -> None:
    """Render the leaderboard from recorded runs (or check that the committed one is current)."""
    from apm_bench.reporting import leaderboard as board

    if not check:
        check_output_dir(out, "--out")
    if check:
        try:
            board.check(runs, out)
        except board.StaleLeaderboard as exc:
            _fail(str(exc), 1)
        console.print(f"{out / 'LEADERBOARD.md'} matches the runs under {runs}")
        return
    from apm_bench.reporting.view.page import write_leaderboard_page

    outputs = board.build(runs, out)
    page = write_leaderboard_page(runs, out / "index.html")
    for path in (outputs.markdown, outputs.csv, outputs.png, page):
        console.print(f"wrote {path}")


@app.command()
def view(
    path: Path = typer.Argument(Path("results/runs"), help="a run folder, a folder of runs, or a results folder with LEADERBOARD.md"),
    out: Optional[Path] = typer.Option(None, help="the page to write (default: report.html in a run folder, else index.html)"),
    serve: bool = typer.Option(False, "--serve", help="also serve the page on 127.0.0.1 until Ctrl-C"),
    port: int = typer.Option(8000, min=0, max=65535, help="port for --serve (0: any free port)"),
) -> None:
    """Write a run, a list of runs or the leaderboard as a static page that opens offline."""
    from apm_bench.reporting.view.page import write_page

    if out is not None:
        check_output_file(out, "--out")
    page = write_page(path, out)
    console.print(f"wrote {page} (open it in a browser: file://{page.resolve()})")
    if serve:
        from apm_bench.reporting.view.serve import serve_page

        serve_page(page, port, console.print)


@app.command()
def robustness(
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="method(s) to check; the baseline always runs"),
    model: Optional[str] = typer.Option(None, help="generator: a real model (alias, hub id or local path)"),
    backend: Optional[str] = typer.Option(None, help="engine for --model: hf, vllm or openai"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server for --backend openai"),
    candidate_model: Optional[str] = typer.Option(None, "--candidate-model", help="model writing the fit's candidates (default sim-large)"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="judge of the fit's candidates (default sim-judge)"),
    writer_model: Optional[str] = typer.Option(None, "--writer-model", help="history writer (default sim)"),
    roles: Optional[str] = typer.Option(None, "--roles", help="fill unset roles: 'same' or 'paper'"),
    mmlu_pro: Optional[str] = typer.Option(None, "--mmlu-pro", help="MMLU-Pro: file, folder or hub id (TIGER-Lab/MMLU-Pro)"),
    truthfulqa: Optional[str] = typer.Option(None, "--truthfulqa", help="TruthfulQA mc1: file, folder or hub id (truthfulqa/truthful_qa)"),
    bbq: Optional[str] = typer.Option(None, "--bbq", help="BBQ: file, folder or hub id (heegyu/bbq)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="questions per benchmark (default all; the authors' quick check: 200)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="question order, TruthfulQA choice order, user pairing (default 42)"),
    world: Optional[int] = typer.Option(None, "--world", help="world seed the methods are fitted on (default 0)"),
    users: Optional[int] = typer.Option(None, help="users in the population (default 400)"),
    history_len: Optional[int] = typer.Option(None, "--history-len", help="past messages per user"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="answer budget (default 1024)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="call cache file (default .apm-cache/calls.sqlite)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not read or write the call cache"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of run options for the fits (CLI options win)"),
    out: Optional[Path] = typer.Option(None, help="where robustness folders go (default results/robustness)"),
) -> None:
    """Accuracy on MMLU-Pro, TruthfulQA and BBQ with each method's personalization vs the baseline."""
    from apm_bench.run.config import load_config
    from apm_bench.run.robustness import robustness_config, run_robustness

    overrides = {"methods": _split(method), "model": model, "backend": backend, "base_url": base_url,
                 "candidate_model": candidate_model, "judge_model": judge_model, "writer_model": writer_model,
                 "roles": roles, "users": users, "history_len": history_len, "max_tokens": max_tokens, "cache": cache}
    run_config = load_config(config, overrides)
    if no_cache:
        run_config = run_config.model_copy(update={"cache": None})
    check_output_dir(out or Path("results/robustness"), "--out")
    check = robustness_config(run_config, {"mmlu-pro": mmlu_pro, "truthfulqa": truthfulqa, "bbq": bbq},
                              limit=limit, seed=seed, world=world, out=out)
    import pandas as pd

    from apm_bench.reporting.robustness import robustness_table, write_robustness

    with _progress_bar(40) as bar:
        task = bar.add_task("preparing", total=None)
        result = run_robustness(check, progress=lambda s, d, t: bar.update(task, description=s, completed=d, total=t))
    folder = write_robustness(result, time.perf_counter() - PROCESS_START)
    table = Table(title="accuracy, and Δ vs baseline on the same questions")
    for column in ("benchmark", "method", "n", "accuracy", "95 % CI", "Δ", "Δ 95 % CI", "unparseable"):
        table.add_column(column)
    for row in robustness_table(result.metrics).itertuples():
        delta = "–" if pd.isna(row.delta) else f"{row.delta:+.3f}"
        delta_ci = "–" if pd.isna(row.delta) else f"[{row.delta_ci_low:+.3f}, {row.delta_ci_high:+.3f}]"
        table.add_row(row.benchmark, escape(row.method), str(row.n), f"{row.accuracy:.3f}",
                      f"[{row.ci_low:.3f}, {row.ci_high:.3f}]", delta, delta_ci, str(row.unparseable))
    console.print(table)
    console.print(f"wrote [bold]{folder}[/bold] in {time.perf_counter() - PROCESS_START:.1f} s")


@app.command()
@_with_run_options
def curve(
    vary: tuple[str, str] = typer.Option(..., "--vary", metavar="FIELD V1,V2,...",
                                         help="the run option to vary and its values: history_len, train_users, users or pool"),
    *,
    options: dict[str, Any],
) -> None:
    """A learning curve: one run per value, then each method's Δ with its CI against the value
    (curve.json, curve.csv, curve.png; --out is where curve folders go, default results/curves)."""
    from apm_bench.reporting.curve import CURVE_FIELDS, parse_values, run_curve

    field, text = vary
    CURVE_FIELDS.get(field)
    if options.get(field) is not None:
        raise ApmError(f"--vary {field} sets {field} itself; drop --{field.replace('_', '-')}")
    values = parse_values(text)
    base = _run_config({**options, "out": options["out"] or Path("results/curves")})
    check_output_dir(base.out, "--out")
    with _progress_bar(60) as bar:
        points = bar.add_task("points", total=None)
        stage = bar.add_task("preparing", total=None)

        def on_point(name: str, done: int, total: int) -> None:
            bar.update(points, description=f"point {name}", completed=done, total=total)

        def show(text: str, done: int, total: int) -> None:
            bar.update(stage, description=text, completed=done, total=total)

        folder, record = run_curve(base, field, values, on_point, show)
    _print_curve(record)
    console.print(f"wrote [bold]{folder}[/bold] ({len(record.runs)} runs) in {record.wall_seconds:.1f} s")


def _print_curve(record) -> None:  # type: ignore[no-untyped-def]
    table = Table(title=f"Δ score vs baseline by {record.field}, pooled over worlds")
    for column in (record.field, "method", "n", "Δ score", "95 % CI", "gain"):
        table.add_column(column)
    for value in record.values:
        for p in (p for p in record.points if p.value == value):
            gain = "–" if p.gain is None else f"{p.gain:.2f}"
            table.add_row(str(value), escape(p.method), str(p.n_users), f"{p.delta:+.3f}", f"[{p.ci_low:+.3f}, {p.ci_high:+.3f}]", gain)
        table.add_section()
    console.print(table)


@app.command("select-attributes")
def select_attributes(
    ratings: Path = typer.Argument(..., help="judge ratings, responses × candidate attributes: .npy (names from "
                                             "--names), or .csv / .parquet (column names = attribute names)"),
    out: Path = typer.Option(..., "--out", help="new folder for pools.yaml, pool_k<k>.yaml, selection.json, scree.png"),
    min_entropy: float = typer.Option(1.5, "--min-entropy", min=0.0, help="drop attributes whose ratings carry fewer bits"),
    seed: int = typer.Option(0, help="seed of the parallel analysis's random data"),
    names: Optional[Path] = typer.Option(None, "--names", help="names of a .npy file's columns: YAML (a list, or "
                                         "candidate_attributes: [...]) or text, one per line"),
) -> None:
    """The paper's attribute selection: entropy filter, PCA, parallel analysis, varimax; one pool per k."""
    from apm_bench.judging.attribute_selection import select_attributes as analyse
    from apm_bench.judging.selection_files import check_new_folder, load_ratings, write_selection

    check_new_folder(out)
    matrix, columns = load_ratings(ratings, names)
    result = analyse(matrix, columns, min_entropy=min_entropy, seed=seed)
    console.print(f"{result.n_candidates} candidates, {len(result.dropped)} dropped by entropy "
                  f"(< {min_entropy:g} bits), k95 = {result.k95} ({result.explained:.1%} of the variance)")
    table = Table(title="one attribute per rotated component")
    for column in ("k", "attributes (loading)"):
        table.add_column(column)
    for pool in result.pools:
        table.add_row(str(pool.k), ", ".join(f"{escape(f.attribute)} ({f.loading:+.2f})" for f in pool.factors))
    console.print(table if result.pools else "k95 < 2: no pool of two or more independent attributes")
    for path in write_selection(result, out, ratings):
        console.print(f"wrote {path}")


def main() -> None:
    """Entry point: bad input becomes one `error: …` line on stderr and exit code 2; any other
    failure one line and exit code 1, with the traceback only under `--debug` (or APM_DEBUG=1)."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("APM_DEBUG") == "1"
    sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--debug")]
    try:
        result = app(standalone_mode=False)
    except ApmError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        _usage_error(exc)
        if debug:
            raise
        _fail(_last_resort(exc), 1)
    sys.exit(result if isinstance(result, int) else 0)


def _usage_error(exc: Exception) -> None:
    """typer bundles its own copy of click, so its usage errors are recognised by shape."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare `apm`: show the help, exit as click does
        print(exc.format_message())  # type: ignore[attr-defined]
        sys.exit(2)
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        _fail(exc.format_message(), int(exc.exit_code))
    if type(exc).__name__ == "Abort":
        _fail("aborted", 1)


def _last_resort(exc: Exception) -> str:
    """One line for a failure nothing named earlier: the system's words for an OS fault (a full
    disk, a vanished folder), else the exception, and where the traceback is."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where} (rerun with --debug for the traceback)"
    detail = str(exc).splitlines()[0] if str(exc) else "no message"
    return f"unexpected {type(exc).__name__}: {detail} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    main()
