"""Pages over many runs: the list of run folders under a results folder, and the leaderboard.

Both read only `metrics.json` / `config.json` (and the leaderboard's own table), so a results folder
with hundreds of runs lists in well under a second; each row links to the run's own page.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from apm_bench.errors import ApmError
from apm_bench.reporting.leaderboard import REFERENCE_NAMES, SETTING, Setting, collect, read_run_folder

LEADERBOARD_INTRO = (
    "Δ = mean over test users of R(method) − R(baseline) on the same prompts, with a 95 % CI from a seeded "
    "bootstrap over worlds and users. W/T/L = share of users the method wins, ties and loses against the baseline; "
    "gain = Δ / Δ(oracle); LC Δ = Δ after length control; no-history Δ = the same method with empty histories "
    "(it should contain 0). Rows from the embedded simulator show whether a method infers hidden preferences in a "
    "controlled world, not how it does on real LLMs. Click a column to sort; a method opens its run."
)
ROW_FIELDS = ("delta", "ci_low", "ci_high", "win", "tie", "loss", "gain", "lc_delta", "no_history_delta",
              "no_history_ci_low", "no_history_ci_high", "failed_ratings", "generation_calls", "training_steps",
              "fit_seconds")


def run_folders(root: Path) -> list[Path]:
    """Every finished run folder under `root` (staging folders of unfinished runs left out)."""
    return sorted(p.parent for p in root.rglob("metrics.json") if not p.parent.name.startswith(".tmp-"))


def runs_payload(root: Path, page: Path, run_page_name: str) -> dict[str, Any]:
    """The runs under `root`, newest first, each linking (relative to `page`) to its own page."""
    folders = run_folders(root)
    if not folders:
        raise ApmError(f"no run folders under {root} (a run folder holds metrics.json)")
    runs = []
    for folder in reversed(folders):
        record, config, _ = read_run_folder(folder)
        runs.append({
            "run_id": record.run_id, "href": _href(page.parent, folder / run_page_name), "created": record.created,
            "model": record.model, "simulated": record.model.startswith("sim"), "methods": record.methods,
            "worlds": record.worlds, "users": config.get("users"), "wall_seconds": record.wall_seconds,
            "pooled": [{"method": m.method, "delta": m.delta, "ci_low": m.ci_low, "ci_high": m.ci_high}
                       for m in record.metrics if m.world == "pooled" and m.method != "baseline"],
        })
    return {"kind": "runs", "title": f"apm-bench runs in {root}", "root": str(root), "runs": runs}


def leaderboard_payload(runs: Path, page: Path, run_page_name: str) -> dict[str, Any]:
    """The leaderboard's tables, each row linking (relative to `page`) to the run that gave it."""
    frame = collect(runs)
    folders = {_run_id(folder): folder for folder in run_folders(runs)}
    settings = []
    for _, rows in frame.groupby(SETTING, sort=False):
        setting = Setting.of_row(rows.iloc[0])
        settings.append({"title": setting.title, "simulated": setting.simulator,
                         "rows": [_row(row, folders, page.parent, run_page_name) for row in rows.to_dict("records")]})
    return {"kind": "leaderboard", "title": "apm-bench leaderboard", "intro": LEADERBOARD_INTRO, "settings": settings}


def _row(row: dict[str, Any], folders: dict[str, Path], base: Path, run_page_name: str) -> dict[str, Any]:
    folder = folders.get(row["run_id"])
    return {
        "method": REFERENCE_NAMES.get(row["method"], row["method"]),
        **{name: _finite(row.get(name)) for name in ROW_FIELDS},
        "run_id": row["run_id"],
        "href": None if folder is None else _href(base, folder / run_page_name),
    }


def _run_id(folder: Path) -> str:
    try:
        return str(json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError):
        return folder.name


def _finite(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value


def _href(base: Path, target: Path) -> str:
    return Path(os.path.relpath(target, base)).as_posix()
