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
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="method(s) to evaluate; baseline and oracle always run"),
    model: Optional[str] = typer.Option(None, help="generator model alias (default sim-large)"),
    worlds: Optional[str] = typer.Option(None, help="number of world seeds, or a comma list of seeds (default 3)"),
    users: Optional[int] = typer.Option(None, help="users in the population (default 400)"),
    n_attr: Optional[int] = typer.Option(None, "--n-attr", help="active attributes per user: 1 or 2"),
    pool: Optional[int] = typer.Option(None, help="pool size k: principles and attributes used (2..10)"),
    mapping: Optional[str] = typer.Option(None, help="world matrix kind: permutation or dense"),
    n_perm: Optional[int] = typer.Option(None, "--n-perm", help="overlaid signed permutations in C"),
    history_len: Optional[int] = typer.Option(None, "--history-len", help="past messages per user (default 4)"),
    label_strategy: Optional[list[str]] = typer.Option(None, "--label-strategy", help="routing labels: abs, abs_two_sided, margin, regression or all"),
    control: Optional[str] = typer.Option(None, help="no-history or shuffled-history"),
    data_seed: Optional[int] = typer.Option(None, "--data-seed", help="seed of the user population and split (default 0)"),
    principles: Optional[Path] = typer.Option(None, "--principles", help="folder with principles.yaml (and antonyms.yaml)"),
    personas: Optional[Path] = typer.Option(None, "--personas", help="folder with attributes.yaml and seeds.yaml"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="neutral prompt file (JSONL or Parquet)"),
    conversations: Optional[Path] = typer.Option(None, "--conversations", help="users in the APM reference JSONL format"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of run options (CLI options win)"),
    out: Optional[Path] = typer.Option(None, help="where run folders go (default results/runs)"),
) -> None:
    """Run the benchmark and write results/runs/<run-id>/."""
    from apm_bench.config import load_config

    overrides = {
        "methods": _split(method),
        "model": model,
        "worlds": _worlds(worlds),
        "users": users,
        "n_attr": n_attr,
        "pool": pool,
        "mapping": mapping,
        "n_perm": n_perm,
        "history_len": history_len,
        "label_strategy": _split(label_strategy),
        "control": control,
        "data_seed": data_seed,
        "principles_dir": principles,
        "personas_dir": personas,
        "prompts_file": prompts,
        "conversations_file": conversations,
        "out": out,
    }
    run_config = load_config(config, overrides)

    from apm_bench.results import write_run
    from apm_bench.runner import run_benchmark

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("preparing", total=None)

        def show(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        result = run_benchmark(run_config, progress=show)
    folder = write_run(result, time.perf_counter() - PROCESS_START)
    _print_summary(result.metrics)
    console.print(f"wrote [bold]{folder}[/bold] in {time.perf_counter() - PROCESS_START:.1f} s")


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
