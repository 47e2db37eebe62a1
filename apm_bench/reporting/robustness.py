"""Robustness records on disk: `results/robustness/<id>/` with robustness.json, robustness.csv,
robustness.png and answers.parquet (one row per question and method).

Written under a temporary name and renamed into place when complete, as run folders are, so
nothing already there is ever overwritten.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from apm_bench.judging.accuracy import AccuracyMetrics, CategoryAccuracy
from apm_bench.reporting.results import git_revision, package_versions, safe_name, training_summary
from apm_bench.run.robustness import RobustnessResult

SCHEMA_VERSION = 1
TABLE_COLUMNS = ["benchmark", "method", "n", "correct", "accuracy", "ci_low", "ci_high", "delta", "delta_ci_low",
                 "delta_ci_high", "unparseable", "failed_generations", "trimmed_prompts"]


class QuestionSetRecord(BaseModel):
    source: str
    questions: int


class RobustnessRecord(BaseModel):
    """robustness.json: the accuracy table with everything needed to reproduce it."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    created: str
    model: str
    backend: str | None
    methods: list[str]
    world: int
    seed: int
    limit: int | None
    sets: dict[str, QuestionSetRecord]
    wall_seconds: float
    metrics: list[AccuracyMetrics]
    categories: list[CategoryAccuracy]
    costs: dict[str, dict[str, float]]
    training: list[dict[str, Any]] = []
    #: the fits' run config, package versions and git revision
    config: dict[str, Any]


def robustness_table(metrics: list[AccuracyMetrics]) -> pd.DataFrame:
    """Benchmark × method: n, accuracy with its CI, Δ vs the baseline with its CI, failures."""
    return pd.DataFrame([m.model_dump() for m in metrics], columns=TABLE_COLUMNS)


def plot_robustness(metrics: list[AccuracyMetrics], path: Path) -> None:
    """Accuracy per benchmark, one bar per method (the baseline first), with 95 % CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(m.benchmark for m in metrics))
    methods = list(dict.fromkeys(m.method for m in metrics))
    width = 0.8 / max(len(methods), 1)
    figure, axis = plt.subplots(figsize=(1.5 + 1.6 * len(benchmarks) * max(len(methods), 2) / 3, 3.6), dpi=120)
    for j, method in enumerate(methods):
        mine = {m.benchmark: m for m in metrics if m.method == method}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, b in enumerate(benchmarks) if b in mine]
        rows = [mine[b] for b in benchmarks if b in mine]
        heights = [m.accuracy for m in rows]
        errors = [[m.accuracy - m.ci_low for m in rows], [m.ci_high - m.accuracy for m in rows]]
        axis.bar(xs, heights, width=width, label=method)
        axis.errorbar(xs, heights, yerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=0.9)
    axis.set_xticks(range(len(benchmarks)), benchmarks)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("accuracy (95 % CI)")
    axis.legend(fontsize=8, frameon=False, ncols=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def write_robustness(result: RobustnessResult, wall_seconds: float) -> Path:
    """Write everything to a temporary folder, then rename it to its final, unused name."""
    config = result.config
    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc)
    methods = list(dict.fromkeys(m.method for m in result.metrics))
    run_id = f"{created:%Y%m%d-%H%M%S}-robustness-{safe_name('+'.join(config.run.methods))}-{safe_name(config.run.model)}"
    final, suffix = root / run_id, 1
    while final.exists():
        suffix += 1
        final = root / f"{run_id}-{suffix}"
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    staging.mkdir()
    try:
        counts = result.rows.drop_duplicates("question_id").groupby("benchmark", sort=False).size()
        fit_config = config.fit_config().model_dump(mode="json")
        record = RobustnessRecord(
            run_id=final.name, created=created.isoformat(timespec="seconds"), model=config.run.model,
            backend=config.run.backend, methods=methods, world=config.world, seed=config.seed, limit=config.limit,
            sets={b: QuestionSetRecord(source=str(s), questions=int(counts.get(b, 0))) for b, s in config.sets.items()},
            wall_seconds=round(wall_seconds, 2), metrics=result.metrics, categories=result.categories,
            costs=result.costs, training=[training_summary(t) for t in result.training],
            config={**fit_config, "versions": package_versions(), "git_revision": git_revision()},
        )
        (staging / "robustness.json").write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
        robustness_table(result.metrics).to_csv(staging / "robustness.csv", index=False, float_format="%.4f")
        result.rows.to_parquet(staging / "answers.parquet", index=False)
        plot_robustness(result.metrics, staging / "robustness.png")
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
