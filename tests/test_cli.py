"""End-to-end tests of the `apm` command line.

Every command runs with cwd set to a temporary folder and an explicit `--out`, so nothing touches
the repository's results/. The real runs, third-party plugins and the width of a pipe run `apm` as a
subprocess; the other calls run it in this process through its entry point (`apm_inline`), since a
fresh interpreter would cost more than the check. A real run loads a sentence embedder, so the file
makes exactly two real runs as subprocesses, shared through the module-scoped `two_runs` fixture; they
start in a background thread when the module starts and overlap with the quick calls (the run tests
come last).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

TIMEOUT_S = 240
SMALL_RUN = ["--users", "60", "--worlds", "1", "--history-len", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FILES = {"config.json", "samples.parquet", "metrics.json", "report.md", "delta.png"}
OLD_METRICS = '{"run_id": "old-run", "note": "must survive bad input"}\n'


def apm(*args: object, cwd: Path, pythonpath: Path | None = None, columns: int | None = 4000) -> subprocess.CompletedProcess:
    """Run `python -m apm_bench.cli ARGS` in `cwd`.

    `columns` sets the width rich renders for. The default (very wide) keeps long messages and
    table cells from being wrapped or elided; `columns=None` leaves it at what a pipe gets (80).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "PYTHONPATH")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    # the checkout these tests sit in, not whatever the environment has installed (worktrees, clones)
    checkout = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([checkout] + ([str(pythonpath)] if pythonpath is not None else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return subprocess.run(
        [sys.executable, "-m", "apm_bench.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def apm_inline(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`apm ARGS` in this process, through `main()` as the console script calls it, in `cwd`: for calls
    that are not about a fresh process (bad input, listings, help, an option's effect on a small run),
    which would otherwise pay for the interpreter and its imports. Rich renders for 80 columns here."""
    from apm_bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = ["apm", *map(str, args)]
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["apm", *map(str, args)], code, out.getvalue(), err.getvalue())


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def unwrapped(text: str) -> str:
    """Output without whitespace: rich wraps a long line (a deep temporary path) at a pipe's 80 columns."""
    return "".join(text.split())


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path below `folder` (hidden ones included) with the bytes of each file."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def run_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third-party method package plus a fake installed distribution advertising its entry point."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "apm_plugin_demo"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            from apm_bench.backends.base import chat
            from apm_bench.methods import Personalization, Personalizer, register_method
            from apm_bench.world.prompting import style_instruction


            @register_method("demo-constant")
            class Demo(Personalizer):
                description = "demo plugin: always FOLLOW the first principle"

                def fit(self, context):
                    self._principle = context.principles[0]

                def personalize(self, user, prompt):
                    return Personalization(chat(prompt, system=style_instruction(self._principle, "follow")))
            '''
        ),
        encoding="utf-8",
    )
    dist_info = root / "apm_plugin_demo-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: apm-plugin-demo\nVersion: 0.1\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text("[apm_bench.methods]\ndemo-constant = apm_plugin_demo:Demo\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def bad_input_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cwd for the bad-input calls: an output folder holding an earlier run, and broken inputs."""
    work = tmp_path_factory.mktemp("bad-input")
    old_run = work / "OUT" / "old-run"
    old_run.mkdir(parents=True)
    (old_run / "metrics.json").write_text(OLD_METRICS, encoding="utf-8")

    broken = work / "broken-principles"
    broken.mkdir()
    (broken / "principles.yaml").write_text("principles:\n  - id: [unclosed\n    name: x\n", encoding="utf-8")

    (work / "unknown-key.yaml").write_text("users: 60\nfrobnicate: 3\n", encoding="utf-8")
    return work


def _two_real_runs(work: Path) -> dict:
    """The only two real runs in this file: the same small command twice into the same --out."""
    out = work / "OUT"
    command = ["run", "--method", "routing", *SMALL_RUN, "--out", out]

    first = apm(*command, cwd=work, columns=None)
    folders_after_first = run_folders(out) if out.is_dir() else []
    entries_after_first = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    first_snapshot = snapshot(folders_after_first[0]) if len(folders_after_first) == 1 else {}

    second = apm(*command, cwd=work, columns=None) if first.returncode == 0 else None
    return {
        "work": work,
        "out": out,
        "first": first,
        "second": second,
        "folders_after_first": folders_after_first,
        "entries_after_first": entries_after_first,
        "first_snapshot": first_snapshot,
    }


@pytest.fixture(scope="module", autouse=True)
def _real_runs_in_background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start the two real runs when the module starts, so they overlap with the quick CLI calls.

    Only when a selected test needs them (e.g. not under `-k methods`).
    """
    if not any("two_runs" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    work = tmp_path_factory.mktemp("runs")
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(_two_real_runs, work)


@pytest.fixture(scope="module")
def two_runs(_real_runs_in_background) -> dict:
    assert _real_runs_in_background is not None
    result = _real_runs_in_background.result(timeout=3 * TIMEOUT_S)
    assert result["first"].returncode == 0, describe(result["first"])
    return result


# --------------------------------------------------------------------------- 1 + 2: bad input

BAD_INPUTS = [
    pytest.param(["--method", "routng"], ["routng", "did you mean 'routing'"], id="unknown-method"),
    pytest.param(["--model", "gpt-9"], ["unknown model", "gpt-9", "sim-large"], id="unknown-model"),
    pytest.param(["--mapping", "diagonal"], ["mapping", "permutation"], id="mapping-diagonal"),
    pytest.param(["--n-attr", "0"], ["n_attr"], id="n-attr-0"),
    pytest.param(["--label-strategy", "best"], ["label", "'best'"], id="label-strategy-best"),
    pytest.param(["--control", "nothing"], ["control", "no-history"], id="control-nothing"),
    pytest.param(["--worlds", "x"], ["--worlds", "'x'"], id="worlds-x"),
    pytest.param(["--worlds", "0"], ["--worlds", "at least one"], id="worlds-0"),
    pytest.param(["--prompts", "missing.jsonl"], ["missing.jsonl", "not found"], id="missing-prompts"),
    pytest.param(["--principles", "broken-principles"], ["principles.yaml", "malformed yaml"], id="broken-catalog"),
    pytest.param(["--config", "nope.yaml"], ["nope.yaml", "not found"], id="missing-config"),
    pytest.param(["--config", "unknown-key.yaml"], ["frobnicate"], id="config-unknown-key"),
]


@pytest.mark.parametrize(("bad_args", "expected"), BAD_INPUTS)
def test_bad_input_is_one_error_line_and_writes_nothing(
    bad_input_workspace: Path, bad_args: list[str], expected: list[str]
) -> None:
    out = bad_input_workspace / "OUT"
    before = snapshot(out)
    assert before["old-run/metrics.json"] == OLD_METRICS.encode()

    # Options that are valid come first; the bad one is last (for --worlds, the last one wins).
    proc = apm_inline("run", "--users", "60", "--history-len", "2", "--out", out, *bad_args, cwd=bad_input_workspace)

    assert proc.returncode != 0, describe(proc)
    combined = proc.stdout + proc.stderr
    assert "Traceback" not in combined, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(proc)
    message = lines[0]
    assert message.startswith("error:"), describe(proc)
    for fragment in expected:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"

    # Nothing was written, renamed or left half-done under --out.
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert not (bad_input_workspace / "results").exists()


def test_long_error_message_stays_one_line_at_default_width(bad_input_workspace: Path) -> None:
    proc = apm("run", "--method", "routng", "--out", bad_input_workspace / "OUT", cwd=bad_input_workspace, columns=None)
    assert proc.returncode == 2, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith("error:")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["run", "--users", "abc"], id="non-integer-users"),
        pytest.param(["run", "--no-such-option"], id="unknown-option"),
        pytest.param([], id="no-arguments"),
    ],
)
def test_usage_errors_have_no_traceback(bad_input_workspace: Path, args: list[str]) -> None:
    proc = apm_inline(*args, cwd=bad_input_workspace)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    assert proc.returncode == 2, describe(proc)
    if args:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)


# --------------------------------------------------------------------------- 4: listings and help


def test_methods_lists_builtin_methods(tmp_path: Path) -> None:
    proc = apm_inline("methods", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    for name in ("baseline", "oracle", "history", "routing"):
        assert name in proc.stdout
    assert "demo-constant" not in proc.stdout


def test_models_lists_simulated_models(tmp_path: Path) -> None:
    proc = apm_inline("models", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "sim-small" in proc.stdout
    assert "sim-large" in proc.stdout


def test_help(tmp_path: Path) -> None:
    proc = apm_inline("--help", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    for command in ("run", "methods", "models"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_run_help(tmp_path: Path) -> None:
    proc = apm_inline("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    for option in ("--method", "--worlds", "--out", "--label-strategy"):
        assert option in proc.stdout


# --------------------------------------------------------------------------- 5: third-party methods


def test_entry_point_method_is_listed(tmp_path: Path, plugin_dir: Path) -> None:
    proc = apm("methods", cwd=tmp_path, pythonpath=plugin_dir)
    assert proc.returncode == 0, describe(proc)
    assert "demo-constant" in proc.stdout
    assert "always FOLLOW the first principle" in proc.stdout
    for name in ("baseline", "oracle", "history", "routing"):
        assert name in proc.stdout


def test_entry_point_method_is_resolved_by_run(tmp_path: Path, plugin_dir: Path, bad_input_workspace: Path) -> None:
    """Without a third real run: `run` accepts the plugin's name and only then fails on the broken catalog."""
    args = ["run", "--method", "demo-constant", "--out", tmp_path / "OUT",
            "--principles", bad_input_workspace / "broken-principles"]

    with_plugin = apm(*args, cwd=tmp_path, pythonpath=plugin_dir)
    assert with_plugin.returncode == 2, describe(with_plugin)
    assert "malformed YAML" in with_plugin.stderr, describe(with_plugin)
    assert "unknown method" not in with_plugin.stderr

    without_plugin = apm(*args, cwd=tmp_path)
    assert without_plugin.returncode == 2, describe(without_plugin)
    assert "unknown method 'demo-constant'" in without_plugin.stderr, describe(without_plugin)
    assert not (tmp_path / "OUT").exists()


# --------------------------------------------------------------------------- 3: a real run


def test_small_run_writes_one_complete_run_folder(two_runs: dict) -> None:
    first = two_runs["first"]
    assert "Traceback" not in first.stdout + first.stderr, describe(first)
    folders = two_runs["folders_after_first"]
    assert len(folders) == 1, two_runs["entries_after_first"]
    assert two_runs["entries_after_first"] == [folders[0].name], "leftover temporary folder after the run"
    assert folders[0].name in unwrapped(first.stdout)
    assert not (two_runs["work"] / "results").exists(), "the run ignored --out"
    files = set(two_runs["first_snapshot"])
    assert RUN_FILES <= files, files


def test_config_json_records_options_versions_and_revision(two_runs: dict) -> None:
    folder = two_runs["folders_after_first"][0]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert isinstance(config["versions"], dict) and config["versions"]
    assert "apm-bench" in config["versions"]
    assert isinstance(config["git_revision"], str) and config["git_revision"]
    assert config["methods"] == ["routing"]
    assert config["users"] == 60
    assert config["worlds"] == [0]
    assert config["history_len"] == 2


def test_samples_parquet_has_every_method_and_baseline_rewards(two_runs: dict) -> None:
    import pandas as pd

    folder = two_runs["folders_after_first"][0]
    samples = pd.read_parquet(folder / "samples.parquet")
    assert {"world", "user_id", "method", "response", "reward", "baseline_reward"} <= set(samples.columns)
    assert {"baseline", "oracle", "routing"} <= set(samples["method"])
    assert set(samples["world"]) == {0}
    assert len(samples) > 0
    per_method = samples.groupby("method")["user_id"].apply(lambda ids: tuple(sorted(ids)))
    assert per_method.nunique() == 1, "methods were evaluated on different test users"
    baseline = samples[samples["method"] == "baseline"].set_index("user_id")["reward"]
    expected = samples["user_id"].map(baseline)
    assert (samples["baseline_reward"] == expected).all()
    assert samples["response"].map(lambda r: isinstance(r, str) and r != "").all()


def test_metrics_json_has_pooled_routing_metric(two_runs: dict) -> None:
    folder = two_runs["folders_after_first"][0]
    record = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert record["run_id"] == folder.name
    assert "routing" in record["methods"]
    pooled = [m for m in record["metrics"] if m["method"] == "routing" and m["world"] == "pooled"]
    assert len(pooled) == 1
    metric = pooled[0]
    assert metric["n_users"] > 0
    assert metric["ci_low"] <= metric["delta"] <= metric["ci_high"]


def test_report_and_plot(two_runs: dict) -> None:
    folder = two_runs["folders_after_first"][0]
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "routing" in report
    assert "style simulator" in report  # the note that simulator numbers are not LLM claims
    assert folder.name in report
    assert (folder / "delta.png").read_bytes().startswith(PNG_MAGIC)


def test_second_identical_run_adds_a_folder_and_keeps_the_first(two_runs: dict) -> None:
    second = two_runs["second"]
    assert second is not None and second.returncode == 0, describe(second)
    first_folder = two_runs["folders_after_first"][0]
    folders = run_folders(two_runs["out"])
    assert len(folders) == 2
    assert first_folder in folders
    new_folder = next(f for f in folders if f != first_folder)
    assert new_folder.name in unwrapped(second.stdout)
    assert RUN_FILES <= {p.name for p in new_folder.iterdir()}
    assert snapshot(first_folder) == two_runs["first_snapshot"], "the second run changed the first run's folder"
    assert not [p for p in two_runs["out"].iterdir() if p.name.startswith(".tmp-")]


def test_max_targets_keeps_the_largest_entries_of_a_dense_mapping(tmp_path: Path) -> None:
    """The paper scores a dense world on the top n_attr principles by |r|, not on all of them."""
    import pandas as pd

    proc = apm_inline("run", *SMALL_RUN, "--mapping", "dense", "--n-attr", "2", "--max-targets", "2", "--method", "routing",
                      "--out", tmp_path / "runs", "--cache", tmp_path / "calls.sqlite", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    samples = pd.read_parquet(next((tmp_path / "runs").glob("*/samples.parquet")))
    assert samples["targets"].map(len).max() == 2
    assert json.loads(next((tmp_path / "runs").glob("*/config.json")).read_text())["max_targets"] == 2


def test_a_test_conversation_file_needs_a_training_file(tmp_path: Path) -> None:
    proc = apm_inline("run", "--test-conversations", tmp_path / "test.jsonl", "--out", tmp_path / "runs", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "conversations_file" in proc.stderr
    assert not (tmp_path / "runs").exists()
