"""Run folders: written whole under a safe name, whatever the model is called."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.reporting.results import safe_name, write_run
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sim-large", "sim-large"),
        ("Qwen/Qwen3.5-27B", "Qwen--Qwen3.5-27B"),
        ("/tmp/models/tiny-llama/", "tiny-llama"),
        ("./my models/v2", "v2"),
        ("routing+rag", "routing+rag"),
        ("a b:c*d", "a-b-c-d"),
        ("..", "model"),
    ],
)
def test_safe_name(name: str, expected: str) -> None:
    assert safe_name(name) == expected


def test_a_run_of_a_model_given_as_a_path_or_hub_id_is_written(embedder: HistoryEmbedder, tmp_path: Path) -> None:
    """A `/` in the model name once made the final rename fail after the whole run had been computed."""
    result = run_benchmark(RunConfig(methods=["routing"], worlds=[0], users=40, history_len=2, cache=None,
                                     bootstrap_resamples=200, out=tmp_path / "runs"), embedder=embedder)
    for model in ("/tmp/some models/tiny-llama", "Qwen/Qwen3.5-27B"):
        result.config = result.config.model_copy(update={"model": model})
        folder = write_run(result, 1.0)
        assert folder.parent == tmp_path / "runs" and "/" not in folder.name
        assert json.loads((folder / "config.json").read_text())["model"] == model
        assert (folder / "metrics.json").is_file() and (folder / "report.md").is_file()
    assert not list((tmp_path / "runs").glob(".tmp-*"))


def test_two_runs_publishing_the_same_name_both_keep_their_folders(tmp_path: Path) -> None:
    """A concurrent run that took the name between the check and the rename: the second gets -2."""
    from apm_bench.reporting.results import publish

    first, second = tmp_path / ".tmp-a-1", tmp_path / ".tmp-a-2"
    for staging, marker in ((first, "one"), (second, "two")):
        staging.mkdir()
        (staging / "metrics.json").write_text(marker)
    assert publish(first, tmp_path, "20261129-run").name == "20261129-run"
    assert publish(second, tmp_path, "20261129-run").name == "20261129-run-2"
    assert (tmp_path / "20261129-run" / "metrics.json").read_text() == "one"
    assert (tmp_path / "20261129-run-2" / "metrics.json").read_text() == "two"


def test_staging_folders_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from apm_bench.reporting.results import remove_stale_staging

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".tmp-20261129-run-{finished.stdout.strip()}"
    alive = tmp_path / f".tmp-20261129-other-{os.getpid()}"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "samples.parquet").write_bytes(b"partial")
    remove_stale_staging(tmp_path)
    assert not dead.exists() and alive.exists()
