"""A run folder as the viewer's data: a small summary for the page itself, a columnar index of the
test users for filtering, and the users' full samples in chunks the page loads only when opened.

The split is what keeps a paper-sized run (10 worlds × 1 000 test users × 8 methods) quick to open:
the page and its index are read at once, a user's history, prompts and responses only on demand.
Everything is read from the files a run writes, so older run folders open too, with what they have.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from apm_bench.errors import ApmError
from apm_bench.judging.label_diagnostics import top_label

BASELINE = "baseline"
#: users per chunk file: one opened user costs one chunk, a few hundred KB at most
CHUNK_USERS = 50
PAGE_SIZE = 50
#: loss curves are drawn, not read: this many points are plenty for a line
MAX_CURVE_POINTS = 400
SAMPLE_FIELDS = ("system_prompt", "context", "summary", "adapter", "routed_to", "response", "generation_error",
                 "context_trimmed", "reward", "baseline_reward", "failed_ratings")


@dataclass
class RunView:
    """What the page of one run is made of."""

    summary: dict[str, Any]
    index: dict[str, Any] | None = None
    chunks: list[list[dict[str, Any]]] = field(default_factory=list)


def read_run_view(folder: Path) -> RunView:
    """The viewer's data for a run folder: summary, index and chunks."""
    record, config = _read_json(folder / "metrics.json"), _read_json(folder / "config.json")
    samples = _read_parquet(folder / "samples.parquet")
    users = _read_parquet(folder / "users.parquet")
    summary = _summary(folder, record, config)
    if samples is None:
        summary["samples"] = {"available": False, "reason": "this run folder has no samples.parquet"}
        return RunView(summary)
    grouped = _users(samples, users)
    chunks = [grouped[i : i + CHUNK_USERS] for i in range(0, len(grouped), CHUNK_USERS)]
    methods = [m for m in dict.fromkeys(samples["method"]) if m != BASELINE]
    summary["samples"] = {
        "available": True, "reason": None, "has_history": users is not None, "page_size": PAGE_SIZE,
        "methods": methods, "users": len(grouped),
    }
    summary["principles"] = sorted({t["principle"] for u in grouped for t in u["targets"]})
    return RunView(summary, _index(chunks, methods), chunks)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ApmError(f"{path.parent} is not a run folder: it has no {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApmError(f"cannot read {path}: {exc}") from None


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ApmError(f"cannot read {path}: {exc}") from None


def _summary(folder: Path, record: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    run_id = record.get("run_id", folder.name)
    model = str(record.get("model", config.get("model", "")))
    return {
        "kind": "run",
        "title": f"apm-bench run {run_id}",
        "run_id": run_id,
        "created": record.get("created"),
        "model": model,
        "simulated": model.startswith("sim"),
        "wall_seconds": record.get("wall_seconds"),
        "config": config,
        "methods": record.get("methods", []),
        "baseline": BASELINE,
        "worlds": record.get("worlds", []),
        "metrics": record.get("metrics", []),
        "costs": record.get("costs", {}),
        "training": _training(folder, record),
        "label_diagnostics": record.get("label_diagnostics", []),
        "principles": [],
    }


def _training(folder: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The training records with their loss curves (training.json), thinned for drawing."""
    curves = folder / "training.json"
    entries = json.loads(curves.read_text(encoding="utf-8")) if curves.is_file() else record.get("training", [])
    thinned = []
    for entry in entries:
        losses = [float(x) for x in entry.get("losses") or []]
        step = max(1, math.ceil(len(losses) / MAX_CURVE_POINTS))
        summary = {"final_loss": round(losses[-1], 6) if losses else None, "reused": False}
        summary.update({k: v for k, v in entry.items() if k != "losses"})
        summary["losses"] = [round(x, 5) for x in losses[::step]]
        summary["loss_step"] = step
        thinned.append(summary)
    return thinned


def _users(samples: pd.DataFrame, users: pd.DataFrame | None) -> list[dict[str, Any]]:
    """One entry per (world, test user), in the samples' order, each with every method's sample."""
    hidden = {} if users is None else {(int(r.world), str(r.user_id)): r for r in users.itertuples(index=False)}
    grouped: dict[tuple[int, str], dict[str, Any]] = {}
    for row in samples.to_dict("records"):
        key = (int(row["world"]), str(row["user_id"]))
        if key not in grouped:
            grouped[key] = _user_entry(key, row, hidden.get(key))
        grouped[key]["samples"][str(row["method"])] = _sample(row)
    return list(grouped.values())


def _user_entry(key: tuple[int, str], row: dict[str, Any], hidden: Any) -> dict[str, Any]:
    targets = [_plain(t) for t in _as_list(row.get("targets"))]
    return {
        "world": key[0],
        "user_id": key[1],
        "history": [str(m) for m in _as_list(getattr(hidden, "history", None))],
        "prompt": row.get("prompt"),
        "attributes": [_plain(a) for a in _as_list(getattr(hidden, "attributes", None))],
        "targets": targets,
        "true_label": top_label(targets) if targets else None,
        "samples": {},
    }


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    sample = {name: _plain(row.get(name)) for name in SAMPLE_FIELDS}
    sample["context"] = [_plain(m) for m in _as_list(row.get("context"))]
    sample["ratings"] = [_number(r) for r in _as_list(row.get("ratings"))]
    reward, base = _number(row.get("reward")), _number(row.get("baseline_reward"))
    sample["delta"] = None if reward is None or base is None else round(reward - base, 6)
    return sample


def _index(chunks: list[list[dict[str, Any]]], methods: list[str]) -> dict[str, Any]:
    """Columns over users, so filtering 10 000 users is one pass over a few arrays."""
    flat = [(n, user) for n, chunk in enumerate(chunks) for user in chunk]
    return {
        "world": [u["world"] for _, u in flat],
        "user_id": [u["user_id"] for _, u in flat],
        "chunk": [n for n, _ in flat],
        "top": [_top_principle(u["targets"]) for _, u in flat],
        "principles": [sorted({t["principle"] for t in u["targets"]}) for _, u in flat],
        "delta": {m: [_rounded(u["samples"].get(m, {}).get("delta")) for _, u in flat] for m in methods},
    }


def _top_principle(targets: list[dict[str, Any]]) -> str | None:
    return max(targets, key=lambda t: abs(float(t["weight"])))["principle"] if targets else None


def _as_list(value: Any) -> list[Any]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return list(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a parquet value (numpy scalars and arrays, NaN as null)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
