"""Judge diagnostics: the analysis reproduces the authors' table from their raw judge scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apm_bench.errors import ApmError
from apm_bench.judging.analysis import (
    balance_error,
    diagnostics_table,
    load_judge_scores,
    save_judge_scores,
    write_diagnostics,
)

NUMERIC = ["mean_sum", "std_sum", "mean_l1_from_11", "corr", "pval"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "reference" / "apm-judges"
    if not path.is_dir():
        pytest.skip("../shared/reference is not beside the project checkout")
    return path


@pytest.fixture(scope="module")
def reference_table(reference_dir: Path) -> pd.DataFrame:
    return pd.read_csv(reference_dir / "table.csv")


def assert_reproduces(table: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Same rows in the same order, same labels and n, numbers within 1e-4, gaps in the same cells."""
    assert list(table.columns) == list(reference.columns)
    assert len(table) == len(reference)
    assert table["judge"].tolist() == reference["judge"].tolist()
    assert table["pair"].tolist() == reference["pair"].tolist()
    assert table["n"].astype(int).tolist() == reference["n"].astype(int).tolist()
    for column in NUMERIC:
        ours = table[column].to_numpy(dtype=float)
        theirs = reference[column].to_numpy(dtype=float)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=f"empty cells of {column}")
        present = ~np.isnan(theirs)
        deviation = np.abs(ours[present] - theirs[present])
        assert deviation.max(initial=0.0) <= TOLERANCE, f"{column} differs by up to {deviation.max()}"


def test_table_reproduces_reference(reference_dir: Path, reference_table: pd.DataFrame) -> None:
    judges = load_judge_scores(reference_dir)
    assert list(judges) == sorted(p.stem for p in reference_dir.glob("*.npz"))
    assert_reproduces(diagnostics_table(judges), reference_table)


def test_written_files_reproduce_reference(
    reference_dir: Path, reference_table: pd.DataFrame, tmp_path: Path
) -> None:
    judges = load_judge_scores(reference_dir)
    paths = write_diagnostics(judges, tmp_path / "diag")
    assert paths["table"] == tmp_path / "diag" / "table.csv"
    assert_reproduces(pd.read_csv(paths["table"]), reference_table)
    # Empty cells must be written as empty strings, not "nan".
    raw = pd.read_csv(paths["table"], dtype=str, keep_default_na=False)
    raw_reference = pd.read_csv(reference_dir / "table.csv", dtype=str, keep_default_na=False)
    for column in ("corr", "pval"):
        assert (raw[column] == "").tolist() == (raw_reference[column] == "").tolist()
    for name in ("correlation_heatmap", "balance_l1"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balance_error_matches_overall_rows(reference_dir: Path, reference_table: pd.DataFrame) -> None:
    balance = balance_error(load_judge_scores(reference_dir))
    overall = reference_table[reference_table["pair"] == "overall"]
    expected = dict(zip(overall["judge"], overall["mean_l1_from_11"]))
    assert balance.keys() == expected.keys()
    for judge, value in expected.items():
        assert balance[judge] == pytest.approx(value, abs=TOLERANCE)


def test_hand_computed_case(tmp_path: Path) -> None:
    scores = np.array(
        [
            # pair 1: s1 = 1..4, s2 = 2 * s1 -> sums 3, 6, 9, 12; r = +1
            [[1, 2, 3, 4], [2, 4, 6, 8]],
            # pair 2: sums 10, 11, 11, 12; centred s1 and s2 are orthogonal -> r = 0, p = 1
            [[5, 6, 5, 6], [5, 5, 6, 6]],
        ]
    )
    save_judge_scores(tmp_path / "toy.npz", scores, [("long", "short"), ("kind", "rude")])
    table = diagnostics_table(load_judge_scores(tmp_path)).set_index("pair")

    assert table.index.tolist() == ["long/short", "kind/rude", "overall"]
    assert (table["judge"] == "toy").all()
    assert table["n"].tolist() == [4, 4, 8]

    # pair 1: mean 30/4; squared deviations 20.25 + 2.25 + 2.25 + 20.25 = 45 -> sqrt(45/4);
    # |s - 11| = 8, 5, 2, 1 -> 16/4
    assert table.loc["long/short", "mean_sum"] == pytest.approx(7.5)
    assert table.loc["long/short", "std_sum"] == pytest.approx(3.3541, abs=1e-4)
    assert table.loc["long/short", "mean_l1_from_11"] == pytest.approx(4.0)
    assert table.loc["long/short", "corr"] == pytest.approx(1.0)
    assert table.loc["long/short", "pval"] == pytest.approx(0.0, abs=1e-4)

    # pair 2: mean 44/4; squared deviations 1 + 0 + 0 + 1 -> sqrt(0.5); |s - 11| = 1, 0, 0, 1 -> 2/4
    assert table.loc["kind/rude", "mean_sum"] == pytest.approx(11.0)
    assert table.loc["kind/rude", "std_sum"] == pytest.approx(0.7071, abs=1e-4)
    assert table.loc["kind/rude", "mean_l1_from_11"] == pytest.approx(0.5)
    assert table.loc["kind/rude", "corr"] == pytest.approx(0.0, abs=1e-4)
    assert table.loc["kind/rude", "pval"] == pytest.approx(1.0, abs=1e-4)

    # overall: sums 3, 6, 9, 12, 10, 11, 11, 12 -> mean 74/8; squared deviations sum to 71.5
    # -> sqrt(71.5/8); |s - 11| = 8, 5, 2, 1, 1, 0, 0, 1 -> 18/8; no correlation
    assert table.loc["overall", "mean_sum"] == pytest.approx(9.25)
    assert table.loc["overall", "std_sum"] == pytest.approx(2.9896, abs=1e-4)
    assert table.loc["overall", "mean_l1_from_11"] == pytest.approx(2.25)
    assert np.isnan(table.loc["overall", "corr"])
    assert np.isnan(table.loc["overall", "pval"])

    assert balance_error(load_judge_scores(tmp_path)) == {"toy": pytest.approx(2.25)}


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    scores = np.array([[[1.5, 9.0, 3.25], [8.0, 2.0, 7.75]]])
    save_judge_scores(tmp_path / "b_judge.npz", scores, [("warm", "cold")])
    save_judge_scores(tmp_path / "a_judge.npz", scores.astype(int), [("warm", "cold")])
    judges = load_judge_scores(tmp_path)
    assert list(judges) == ["a_judge", "b_judge"]
    np.testing.assert_array_equal(judges["b_judge"].scores, scores)
    assert judges["b_judge"].pairs == [("warm", "cold")]


def assert_one_line_error(excinfo: pytest.ExceptionInfo[ApmError], fragment: str) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message
    assert fragment in message


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ApmError) as excinfo:
        load_judge_scores(tmp_path / "nowhere")
    assert_one_line_error(excinfo, "nowhere")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ApmError) as excinfo:
        load_judge_scores(tmp_path)
    assert_one_line_error(excinfo, "no judge score files")


def test_npz_without_pairs(tmp_path: Path) -> None:
    np.savez(tmp_path / "judge.npz", scores=np.ones((2, 2, 4)))
    with pytest.raises(ApmError) as excinfo:
        load_judge_scores(tmp_path)
    assert_one_line_error(excinfo, "pairs")


def test_inconsistent_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "judge.npz", scores=np.ones((3, 2, 4)), pairs=np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ApmError) as excinfo:
        load_judge_scores(tmp_path)
    assert_one_line_error(excinfo, "judge.npz")
    with pytest.raises(ApmError):
        save_judge_scores(tmp_path / "bad.npz", np.ones((2, 3, 4)), [("a", "b"), ("c", "d")])
