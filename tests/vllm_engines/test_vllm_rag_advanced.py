"""rag-advanced with the generator on a vLLM engine: the generator writes every vibe and preference
description (at fit time for training users, before generation for test users) and then the
answers, all from one engine load; the descriptions, retrieval and system prompts are real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd


def test_rag_advanced_writes_its_descriptions_and_answers_on_one_vllm_engine(generator_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "apm_bench.cli", "run", "--method", "rag-advanced", "--model", str(generator_dir),
               "--backend", "vllm", "--allow-simulated-roles", "--users", "24", "--worlds", "1", "--history-len", "2",
               "--max-tokens", "12",
               "--cache", str(tmp_path / "calls.sqlite"), "--out", str(tmp_path / "runs")]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = list((tmp_path / "runs").iterdir())
    record = json.loads((folder / "metrics.json").read_text())
    # candidates, judge and history writer are the simulator's: the generator is the one engine
    assert record["costs"]["engines"]["engine_loads"] == 1
    samples = pd.read_parquet(folder / "samples.parquet")
    advanced = samples[samples["method"] == "rag-advanced"]
    assert len(advanced) > 0 and advanced["generation_error"].isna().all()
    # the test user's vibe was written by the model and recorded; the system prompt lists k = 3
    # preference descriptions written by the model for the nearest training users
    assert advanced["summary"].notna().all()
    assert advanced["system_prompt"].map(lambda s: s.count("\n- ")).ge(3).all()
    fits = record["costs"]["fit:rag-advanced"]
    assert fits["seconds"] > 0
