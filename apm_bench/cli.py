"""`apm`: the command line. Heavy libraries are imported inside commands, so `apm --help` is quick."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apm_bench.errors import ApmError

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


@app.command()
def run(
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
    history_len: Optional[int] = typer.Option(None, "--history-len", help="past messages per user (default 4)"),
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
) -> None:
    """Run the benchmark and write results/runs/<run-id>/."""
    from apm_bench.run.config import load_config

    overrides = {
        "methods": _split(method),
        "model": model,
        "backend": backend,
        "base_url": base_url,
        "judge_model": judge_model,
        "judge_backend": judge_backend,
        "judge_url": judge_url,
        "judge_weighted": judge_weighted,
        "judge_reasoning_effort": judge_reasoning_effort,
        "judge_max_tokens": judge_max_tokens,
        "judge_temperature": judge_temperature,
        "candidate_model": candidate_model,
        "writer_model": writer_model,
        "roles": roles,
        "allow_simulated_roles": allow_simulated_roles,
        "engine_budget": engine_budget,
        "max_tokens": max_tokens,
        "cache": cache,
        "worlds": _worlds(worlds),
        "users": users,
        "n_attr": n_attr,
        "pool": pool,
        "mapping": mapping,
        "n_perm": n_perm,
        "max_targets": max_targets,
        "protocol": protocol,
        "history_len": history_len,
        "label_strategy": _split(label_strategy),
        "control": control,
        "data_seed": data_seed,
        "balanced_population": balanced,
        "split_per_world": split_per_world,
        "principles_dir": principles,
        "personas_dir": personas,
        "prompts_file": prompts,
        "test_prompts_file": test_prompts,
        "conversations_file": conversations,
        "test_conversations_file": test_conversations,
        "out": out,
    }
    run_config = load_config(config, overrides)
    if no_cache:
        run_config = run_config.model_copy(update={"cache": None})
    if summaries is not None:
        options = {**run_config.method_options, "popi": {**run_config.method_options.get("popi", {}), "summaries_file": summaries}}
        run_config = run_config.model_copy(update={"method_options": options})

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
    port: int = typer.Option(8000, help="port to listen on"),
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

    judges = load_judge_scores(directory)
    paths = write_diagnostics(judges, out or Path(directory) / "analysis")
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
    seed: int = typer.Option(0, help="seed of prompts, instructions and sampling"),
    out: Path = typer.Option(Path("results/judges"), help="folder for the score file and the analysis"),
) -> None:
    """Have a judge rate both words of every antonym pair, save the scores, then analyse them."""
    from apm_bench.judging.calibration import calibrate

    path, dropped = calibrate(
        judge_model, judge_backend, judge_url, judge_weighted, judge_bias, judge_noise, model, per_pair, seed, out
    )
    console.print(f"wrote {path}" + (f" ({dropped} responses dropped for failed ratings)" if dropped else ""))
    judge_analyze(out, out / "analysis")


def _print_judge_table(frame) -> None:  # type: ignore[no-untyped-def]
    overall = frame[frame["pair"] == "overall"]
    table = Table(title="judge balance (overall): mean |s⁺ + s⁻ − 11|, lower is better")
    for column in ("judge", "n", "mean_sum", "std_sum", "mean_l1_from_11"):
        table.add_column(column)
    for _, row in overall.iterrows():
        table.add_row(str(row["judge"]), str(row["n"]), f"{row['mean_sum']:.3f}", f"{row['std_sum']:.3f}", f"{row['mean_l1_from_11']:.3f}")
    console.print(table)


suite_app = typer.Typer(no_args_is_help=True, help="The benchmark suite behind the leaderboard.")
app.add_typer(suite_app, name="suite")


@suite_app.command("run")
def suite_run(
    config: Path = typer.Argument(..., help="suite YAML (e.g. configs/leaderboard.yaml)"),
    only: Optional[str] = typer.Option(None, "--only", help="run just this method (plus baseline, oracle and prior) in every setting"),
) -> None:
    """Run every setting of a suite and record the runs; then `apm leaderboard` renders them."""
    from apm_bench.reporting.suite import load_suite, run_suite

    suite = load_suite(config)
    started = time.perf_counter()
    with _progress_bar(60) as bar:
        settings = bar.add_task("settings", total=None)
        stage = bar.add_task("preparing", total=None)

        def on_setting(name: str, done: int, total: int) -> None:
            bar.update(settings, description=f"setting {name}", completed=done, total=total)

        def show(text: str, done: int, total: int) -> None:
            bar.update(stage, description=text, completed=done, total=total)

        folders = run_suite(suite, only, on_setting, show)
    for folder in folders:
        console.print(f"wrote {folder}")
    console.print(f"suite: {len(folders)} runs in {time.perf_counter() - started:.1f} s; now run `apm leaderboard`")


@app.command()
def leaderboard(
    runs: Path = typer.Option(Path("results/suite"), help="folder of recorded runs (searched recursively)"),
    out: Path = typer.Option(Path("results"), help="where LEADERBOARD.md, leaderboard.csv and leaderboard.png go"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if the files differ from what the runs give"),
) -> None:
    """Render the leaderboard from recorded runs (or check that the committed one is current)."""
    from apm_bench.reporting import leaderboard as board

    if check:
        try:
            board.check(runs, out)
        except board.StaleLeaderboard as exc:
            _fail(str(exc), 1)
        console.print(f"{out / 'LEADERBOARD.md'} matches the runs under {runs}")
        return
    outputs = board.build(runs, out)
    for path in (outputs.markdown, outputs.csv, outputs.png):
        console.print(f"wrote {path}")


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
    """Entry point: bad input becomes one `error: …` line on stderr and a non-zero exit code."""
    try:
        result = app(standalone_mode=False)
    except ApmError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        # typer bundles its own copy of click, so its usage errors are recognised by shape.
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `apm`: show the help, exit as click does
            print(exc.format_message())  # type: ignore[attr-defined]
            sys.exit(2)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _fail(exc.format_message(), int(exc.exit_code))
        if type(exc).__name__ == "Abort":
            _fail("aborted", 1)
        raise
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
