"""Learning curves: one ordinary run per value of one numeric run option, then every method's Δ with
its CI against that value (the paper's history-length and training-size ablations).

The points differ in the varied option only, and are built to differ in nothing else: smaller
`train_users` caps keep subsets of the users larger caps keep, and on simulated populations every
`history_len` point draws the longest history and cuts it, so shorter histories are prefixes of
the same users' histories (same prompts, same evaluation prompts, hence the same baseline). The
runs share the call cache, so what two points have in common (candidates, ratings, the baseline)
is computed once.

A curve folder `<out>/<curve-id>/` holds `curve.json`, `curve.csv`, `curve.png` and the point runs
under `runs/`; like a run folder it is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from apm_bench.errors import ConfigError, first_error
from apm_bench.registry import Registry
from apm_bench.run.config import RunConfig

if TYPE_CHECKING:
    from apm_bench.methods.embedder import HistoryEmbedder

SCHEMA_VERSION = 1
#: the run options a curve may vary: numeric, and each a setting a method's Δ may grow or shrink with
CURVE_FIELDS: Registry[str] = Registry("curve field")
for _field, _about in {
    "history_len": "past messages per user",
    "train_users": "training users a method fits on",
    "users": "users in the population",
    "pool": "principles and attributes in the pool",
}.items():
    CURVE_FIELDS.add(_field, _about)


class CurvePoint(BaseModel):
    """One method at one value: its pooled Δ, the 95 % CI, and the run it comes from."""

    value: int
    method: str
    delta: float
    ci_low: float
    ci_high: float
    n_users: int
    gain: float | None = None
    run_id: str


class CurveRun(BaseModel):
    value: int
    run_id: str
    wall_seconds: float


class CurveRecord(BaseModel):
    """curve.json."""

    schema_version: int = SCHEMA_VERSION
    curve_id: str
    created: str
    field: str
    values: list[int]
    methods: list[str]
    model: str
    worlds: list[int]
    wall_seconds: float
    runs: list[CurveRun]
    points: list[CurvePoint]


def parse_values(text: str) -> list[int]:
    """`1,2,4,8` → [1, 2, 4, 8]: at least two distinct whole numbers."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ConfigError(f"--vary takes whole numbers separated by commas, e.g. 1,2,4,8; got {text!r}") from None
    if len(values) < 2:
        raise ConfigError(f"a curve needs at least two values, got {text!r}")
    if len(set(values)) < len(values):
        raise ConfigError(f"--vary values must be distinct, got {text!r}")
    return values


def plan_curve(base: RunConfig, field: str, values: list[int], out: Path) -> list[tuple[str, RunConfig]]:
    """(label, run config) per value: the base run with `field` set to it and its run folder in `out`."""
    CURVE_FIELDS.get(field)
    fixed = {**base.model_dump(), "out": out}
    if field == "history_len" and base.conversations_file is None and base.drawn_history_len is None:
        fixed["drawn_history_len"] = max(values)
    plans = []
    for value in values:
        try:
            plans.append((f"{field}={value}", RunConfig.model_validate({**fixed, field: value})))
        except ValidationError as exc:
            raise ConfigError(f"--vary {field} {value}: invalid run option {first_error(exc)}") from None
    return plans


def run_curve(
    base: RunConfig,
    field: str,
    values: list[int],
    on_point: Callable[[str, int, int], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    embedder: HistoryEmbedder | None = None,
) -> tuple[Path, CurveRecord]:
    """Check every point, run them in turn, then write the curve folder under `base.out`."""
    from apm_bench.reporting.suite import run_plans

    started = time.perf_counter()
    created = datetime.now(timezone.utc)
    curve_id = new_curve_id(base, field, created)
    root = Path(base.out)
    staging = root / f".tmp-{curve_id}-{os.getpid()}"
    plans = plan_curve(base, field, values, staging / "runs")
    try:
        folders = run_plans(plans, on_point, progress, embedder)  # checks every point before the first runs
        final = unused(root / curve_id)
        record = curve_record(final.name, created, base, field, values, folders, time.perf_counter() - started)
        write_curve_files(record, staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, record


def new_curve_id(base: RunConfig, field: str, now: datetime) -> str:
    from apm_bench.reporting.results import safe_name

    return f"{now:%Y%m%d-%H%M%S}-curve-{field}-{safe_name('+'.join(base.methods))}-{safe_name(base.model)}"


def unused(path: Path) -> Path:
    candidate, suffix = path, 1
    while candidate.exists():
        suffix += 1
        candidate = path.with_name(f"{path.name}-{suffix}")
    return candidate


def curve_record(
    curve_id: str, created: datetime, base: RunConfig, field: str, values: list[int], folders: list[Path], seconds: float
) -> CurveRecord:
    """The pooled rows of every point's metrics.json (the baseline's Δ is 0 by definition: left out)."""
    from apm_bench.reporting.results import RunRecord
    from apm_bench.run.setup import BASELINE

    runs, points = [], []
    for value, folder in zip(values, folders):
        run = RunRecord.model_validate_json((folder / "metrics.json").read_text(encoding="utf-8"))
        runs.append(CurveRun(value=value, run_id=run.run_id, wall_seconds=run.wall_seconds))
        points += [
            CurvePoint(value=value, method=m.method, delta=m.delta, ci_low=m.ci_low, ci_high=m.ci_high,
                       n_users=m.n_users, gain=m.gain, run_id=run.run_id)
            for m in run.metrics
            if m.world == "pooled" and m.method != BASELINE
        ]
    return CurveRecord(
        curve_id=curve_id, created=created.isoformat(timespec="seconds"), field=field, values=values,
        methods=list(dict.fromkeys(p.method for p in points)), model=base.model, worlds=list(base.worlds),
        wall_seconds=round(seconds, 2), runs=runs, points=points,
    )


def write_curve_files(record: CurveRecord, folder: Path) -> None:
    """curve.json, curve.csv (one row per value and method) and curve.png."""
    import pandas as pd

    from apm_bench.reporting.report import plot_curve

    frame = pd.DataFrame([p.model_dump() for p in record.points])
    (folder / "curve.json").write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
    frame.rename(columns={"value": record.field}).to_csv(folder / "curve.csv", index=False)
    plot_curve(record.field, frame, folder / "curve.png")
