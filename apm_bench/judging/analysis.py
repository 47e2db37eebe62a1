"""Judge diagnostics (paper Fig. 6/7): is a judge's 1–10 scale usable as a signed preference signal?

A judge rates each response on both words of an antonym pair (e.g. "verbose" and "terse"). A judge
whose scale means something gives complementary ratings: s⁺ + s⁻ stays near 11 (the balance error
`mean |s⁺ + s⁻ − 11|` is small) and s⁺ and s⁻ are negatively correlated. This module loads the raw
scores (one `.npz` per judge, the format of `shared/reference/apm-judges/`), computes the table the
paper's authors published, and draws two plots. Reproducing their `table.csv` from their scores is
what shows this analysis is the paper's analysis.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from apm_bench.errors import ApmError

COLUMNS = ["judge", "pair", "n", "mean_sum", "std_sum", "mean_l1_from_11", "corr", "pval"]
OVERALL = "overall"
BALANCED_SUM = 11.0  # s⁺ + s⁻ of a judge whose two ratings mirror each other on the 1–10 scale
DECIMALS = 4
# The authors' table.csv ends lines with CRLF; writing the same bytes keeps the files diffable.
CSV_LINE_END = "\r\n"


@dataclass(frozen=True)
class JudgeScores:
    """One judge's ratings: `scores[p, w, i]` is response i rated on word w (0 or 1) of pair p."""

    scores: np.ndarray
    pairs: list[tuple[str, str]]

    @property
    def pair_labels(self) -> list[str]:
        """Pairs as `first/second`, the label the reference table uses."""
        return [f"{first}/{second}" for first, second in self.pairs]


# ---------------------------------------------------------------------------------------------
# Loading and saving


def _check_shapes(scores: np.ndarray, pairs: np.ndarray, source: str) -> None:
    """Fail early on a file the analysis would silently misread (wrong axis order, bad pairs)."""
    if scores.ndim != 3 or scores.shape[1] != 2:
        raise ApmError(f"{source}: `scores` must have shape (pairs, 2, n), got {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ApmError(f"{source}: `scores` must be numeric, got dtype {scores.dtype}")
    if scores.shape[2] == 0:
        raise ApmError(f"{source}: `scores` holds no responses")
    if not np.all(np.isfinite(scores)):
        raise ApmError(f"{source}: `scores` contains non-finite values")
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ApmError(f"{source}: `pairs` must have shape (pairs, 2), got {pairs.shape}")
    if pairs.shape[0] != scores.shape[0]:
        raise ApmError(
            f"{source}: {pairs.shape[0]} pairs in `pairs` but {scores.shape[0]} in `scores`"
        )
    if pairs.dtype.kind not in "US":
        raise ApmError(f"{source}: `pairs` must hold strings, got dtype {pairs.dtype}")
    labels = [f"{first}/{second}" for first, second in pairs.tolist()]
    if len(set(labels)) != len(labels):
        raise ApmError(f"{source}: `pairs` lists a pair more than once")


def _as_pair_list(pairs: np.ndarray) -> list[tuple[str, str]]:
    return [(str(first), str(second)) for first, second in pairs.tolist()]


def _load_one(path: Path) -> JudgeScores:
    """Read one judge's file without pickles (a scores file must never run code)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("scores", "pairs") if key not in data.files]
            if missing:
                raise ApmError(f"{path}: missing array(s) {', '.join(missing)}")
            scores = np.asarray(data["scores"])
            pairs = np.asarray(data["pairs"])
    except ApmError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ApmError(f"{path}: not a readable judge-scores .npz ({reason})") from exc
    _check_shapes(scores, pairs, str(path))
    return JudgeScores(scores=scores, pairs=_as_pair_list(pairs))


def load_judge_scores(directory: Path) -> dict[str, JudgeScores]:
    """All `*.npz` in `directory`, keyed by file stem and sorted, so the table's row order is stable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ApmError(f"judge scores directory not found: {directory}")
    files = sorted(directory.glob("*.npz"), key=lambda p: p.stem)
    if not files:
        raise ApmError(f"no judge score files (*.npz) in {directory}")
    return {path.stem: _load_one(path) for path in files}


def save_judge_scores(path: Path, scores: np.ndarray, pairs: list[tuple[str, str]]) -> None:
    """Write one judge's scores in the reference format, so a new judge can be compared to the 13."""
    path = Path(path)
    scores = np.asarray(scores)
    pair_array = np.array([[str(a), str(b)] for a, b in pairs], dtype=str).reshape(-1, 2)
    _check_shapes(scores, pair_array, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a handle: np.savez would otherwise append ".npz" to a path that lacks it.
    with path.open("wb") as handle:
        np.savez(handle, scores=scores, pairs=pair_array)


# ---------------------------------------------------------------------------------------------
# The table


def _pearson(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """Pearson r and p; NaN where undefined (constant ratings, < 2 responses) instead of a warning."""
    if first.size < 2 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.pearsonr(first, second)
    return float(result.statistic), float(result.pvalue)


def _sum_stats(sums: np.ndarray) -> dict[str, float]:
    """Location, spread (population std) and balance error of s⁺ + s⁻."""
    return {
        "n": int(sums.size),
        "mean_sum": float(np.mean(sums)),
        "std_sum": float(np.std(sums, ddof=0)),
        "mean_l1_from_11": float(np.mean(np.abs(sums - BALANCED_SUM))),
    }


def _judge_rows(name: str, judge: JudgeScores) -> list[dict[str, object]]:
    """One row per pair, then the `overall` row pooling every pair's sums (no correlation there)."""
    scores = judge.scores.astype(float)
    rows: list[dict[str, object]] = []
    for label, pair_scores in zip(judge.pair_labels, scores):
        first, second = pair_scores
        corr, pval = _pearson(first, second)
        rows.append({"judge": name, "pair": label, **_sum_stats(first + second), "corr": corr, "pval": pval})
    pooled = (scores[:, 0, :] + scores[:, 1, :]).ravel()
    rows.append({"judge": name, "pair": OVERALL, **_sum_stats(pooled), "corr": np.nan, "pval": np.nan})
    return rows


def diagnostics_table(judges: dict[str, JudgeScores]) -> pd.DataFrame:
    """The authors' table: judges in the given order, pairs in file order, `overall` last per judge."""
    rows = [row for name, judge in judges.items() for row in _judge_rows(name, judge)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["n"] = table["n"].astype(int)
    numeric = COLUMNS[3:]
    table[numeric] = table[numeric].astype(float).round(DECIMALS)
    return table


def balance_error(judges: dict[str, JudgeScores]) -> dict[str, float]:
    """Each judge's overall mean |s⁺ + s⁻ − 11| — the one number used to rank judges by balance."""
    table = diagnostics_table(judges)
    overall = table[table["pair"] == OVERALL]
    return dict(zip(overall["judge"], overall["mean_l1_from_11"].astype(float)))


# ---------------------------------------------------------------------------------------------
# Files and plots


def _plot_correlations(table: pd.DataFrame, path: Path) -> None:
    """Judges × pairs heatmap of r(s⁺, s⁻): blue (negative) is what a usable judge looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_pair = table[table["pair"] != OVERALL]
    judges = list(dict.fromkeys(per_pair["judge"]))
    pairs = list(dict.fromkeys(per_pair["pair"]))
    matrix = per_pair.pivot(index="judge", columns="pair", values="corr").reindex(index=judges, columns=pairs)
    values = matrix.to_numpy(dtype=float)

    fig, ax = plt.subplots(figsize=(1.3 * len(pairs) + 3, 0.45 * len(judges) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    for row in range(values.shape[0]):
        for col in range(values.shape[1]):
            value = values[row, col]
            if np.isfinite(value):
                colour = "white" if abs(value) > 0.6 else "black"
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(pairs)), labels=pairs, rotation=30, ha="right")
    ax.set_yticks(range(len(judges)), labels=judges)
    ax.set_title("Pearson r of the two antonym ratings (negative is better)")
    fig.colorbar(image, ax=ax, label="r(s⁺, s⁻)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_balance(table: pd.DataFrame, path: Path) -> None:
    """Overall balance error per judge, best first, so the ranking reads top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = table[table["pair"] == OVERALL].sort_values("mean_l1_from_11", kind="stable")
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(overall) + 1.5))
    ax.barh(overall["judge"], overall["mean_l1_from_11"], color="tab:blue")
    ax.invert_yaxis()  # lowest (best) at the top
    for y, value in enumerate(overall["mean_l1_from_11"]):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.set_xlabel("mean |s⁺ + s⁻ − 11| over all pairs (lower is better)")
    ax.set_title("Judge balance error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_diagnostics(judges: dict[str, JudgeScores], out_dir: Path) -> dict[str, Path]:
    """Write table.csv (byte-format of the reference) and both plots; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = diagnostics_table(judges)
    paths = {
        "table": out_dir / "table.csv",
        "correlation_heatmap": out_dir / "correlation_heatmap.png",
        "balance_l1": out_dir / "balance_l1.png",
    }
    table.to_csv(paths["table"], index=False, na_rep="", lineterminator=CSV_LINE_END)
    _plot_correlations(table, paths["correlation_heatmap"])
    _plot_balance(table, paths["balance_l1"])
    return paths
