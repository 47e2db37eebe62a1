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
