"""`apm judge calibrate` on the simulator: score files in the reference format, and a lenient judge
shows a larger antonym balance error than an unbiased one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from apm_bench.judging.analysis import balance_error, load_judge_scores
from apm_bench.judging.calibration import calibrate, complete_columns


def test_bias_raises_the_balance_error(tmp_path: Path) -> None:
    fair, _ = calibrate("sim-judge", None, None, False, 0.0, 0.75, "sim-large", 30, 0, tmp_path)
    lenient, _ = calibrate("sim-judge", None, None, False, 1.5, 0.75, "sim-large", 30, 0, tmp_path)
    judges = load_judge_scores(tmp_path)
    assert judges[fair.stem].scores.shape == (6, 2, 30)
    assert [tuple(p) for p in judges[fair.stem].pairs][0] == ("verbose", "terse")
    errors = balance_error(judges)
    assert errors[lenient.stem] > errors[fair.stem] + 1.0
    sums = judges[fair.stem].scores.sum(axis=1)
    assert abs(sums.mean() - 11) < 0.5  # an unbiased judge is antonym-consistent on average


def test_failed_ratings_are_dropped_not_filled() -> None:
    scores = np.array([[[1.0, 2.0, np.nan], [9.0, 8.0, 7.0]], [[3.0, 4.0, 5.0], [6.0, np.nan, 4.0]]])
    complete, dropped = complete_columns(scores)
    assert complete.shape == (2, 2, 2) and not np.isnan(complete).any()
    assert complete[1, :, 1].tolist() == [5.0, 4.0]  # the response with a failed rating is gone
    assert dropped == 2


def test_calibrate_command_writes_scores_and_analysis(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apm_bench.cli", "judge", "calibrate", "--per-pair", "12", "--judge-bias", "1",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.glob("*.npz")) and (tmp_path / "analysis" / "table.csv").is_file()
    assert (tmp_path / "analysis" / "correlation_heatmap.png").read_bytes()[:4] == b"\x89PNG"
