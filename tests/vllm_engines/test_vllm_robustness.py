"""`apm robustness` with the generator on a vLLM engine: the questions go through the same Backend
interface as every test generation, so the check needs nothing vLLM-specific; this run shows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from robustness_files import write_bbq, write_mmlu_pro, write_truthfulqa


def test_robustness_runs_with_the_generator_on_vllm(generator_dir: Path, tmp_path: Path) -> None:
    sets = {"--mmlu-pro": write_mmlu_pro(tmp_path / "mmlu_pro.parquet"),
            "--truthfulqa": write_truthfulqa(tmp_path / "truthfulqa.parquet"), "--bbq": write_bbq(tmp_path / "Age.jsonl")}
    command = [sys.executable, "-m", "apm_bench.cli", "robustness", "--method", "routing,rag", "--backend", "vllm",
               "--model", str(generator_dir), *[str(part) for pair in sets.items() for part in pair], "--users", "40",
               "--history-len", "2", "--max-tokens", "8", "--cache", str(tmp_path / "calls.sqlite"),
               "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = list((tmp_path / "out").iterdir())
    answers = pd.read_parquet(folder / "answers.parquet")
    assert sorted(answers["method"].unique()) == ["baseline", "rag", "routing"] and len(answers) == 3 * 13
    assert answers["generation_error"].isna().all()  # a random model may still end a reply at once
    costs = json.loads((folder / "robustness.json").read_text())["costs"]
    assert costs["phase:generation"]["requests"] == 3 * 13 and costs["engines"]["engine_loads"] == 1
    table = pd.read_csv(folder / "robustness.csv")
    assert table.groupby("benchmark")["n"].first().to_dict() == {"bbq": 3, "mmlu-pro": 5, "truthfulqa": 5}
