"""Run records on disk: `results/runs/<run-id>/` with config.json, samples.parquet, users.parquet,
metrics.json, report.md, report.html and delta.png.

A run directory is written under a temporary name and renamed into place when complete, so a
crash or a bad option never leaves a half-written run and never touches earlier runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from apm_bench.errors import ApmError
from apm_bench.judging.label_diagnostics import LabelDiagnostics
from apm_bench.judging.metrics import MethodMetrics
from apm_bench.reporting.report import plot_deltas, plot_training, render_report
from apm_bench.run.runner import RunResult

SCHEMA_VERSION = 1
TRACKED_PACKAGES = ("apm-bench", "numpy", "pandas", "scikit-learn", "torch", "sentence-transformers", "onnxruntime",
                    "pydantic")


class RunRecord(BaseModel):
    """metrics.json: what a leaderboard needs, without reading the samples."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    created: str
    model: str
    methods: list[str]
    worlds: list[int]
    population: str
    wall_seconds: float
    metrics: list[MethodMetrics]
    costs: dict[str, dict[str, float]]
    #: per trained adapter: world, method, name, steps, examples, seconds, final loss, reused
    training: list[dict[str, Any]] = []
    #: trained weights copied into artifacts/ (PEFT adapters, soft-prompt projectors and tensors)
    artifacts: list[str] = []
    #: routing diagnostics: routers' chosen labels against the users' true top targets
    label_diagnostics: list[LabelDiagnostics] = []


def package_versions() -> dict[str, str]:
    found = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_revision() -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


def safe_name(text: str, limit: int = 60) -> str:
    """A folder-name-safe form of a model or method name: a hub id keeps its owner
    (`Qwen/Qwen3.5-27B` → `Qwen--Qwen3.5-27B`), a local path keeps its last folder."""
    if text.startswith(("/", ".", "~")) or "\\" in text:
        text = Path(text.rstrip("/\\")).name or "model"
    text = re.sub(r"[^A-Za-z0-9._+=-]+", "-", text.replace("/", "--")).strip("-.")
    return text[:limit] or "model"


def new_run_id(result: RunResult, now: datetime | None = None) -> str:
    """`<UTC time>-<methods>-<model>`, safe as one folder name whatever the model is called."""
    now = now or datetime.now(timezone.utc)
    methods = safe_name("+".join(m for m in result.config.methods))
    return f"{now:%Y%m%d-%H%M%S}-{methods}-{safe_name(result.config.model)}"


def _copy_artifacts(result: RunResult, staging: Path) -> list[str]:
    store = result.artifacts
    if store is None or not store.used:
        return []
    return store.copy_used(staging / "artifacts") if result.config.keep_artifacts else sorted(store.used)


def training_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """A training record without its loss curve (that goes to training.json and training.png)."""
    losses = entry.get("losses") or []
    summary = {k: v for k, v in entry.items() if k != "losses"}
    summary["final_loss"] = round(float(losses[-1]), 6) if losses else None
    summary["seconds"] = round(float(entry.get("seconds", 0.0)), 3)
    return summary


def remove_stale_staging(root: Path) -> None:
    """Delete `.tmp-…-<pid>` folders whose writing process is gone (a run killed while writing)."""
    for folder in root.glob(".tmp-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def free_name(root: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`, … : the first no folder under `root` has."""
    suffix = 1
    while (root / (candidate := name if suffix == 1 else f"{name}-{suffix}")).exists():
        suffix += 1
    return candidate


def publish(staging: Path, root: Path, name: str) -> Path:
    """Rename the finished folder to `name`, or to `name-2`, `name-3`, … when another run (perhaps
    a concurrent one) took that name first: never onto an existing folder."""
    while True:
        final = root / free_name(root, name)
        try:
            staging.rename(final)
            return final
        except OSError:  # taken between the check and the rename
            if not final.exists():
                raise


def write_run(result: RunResult, wall_seconds: float) -> Path:
    """Write everything to a temporary folder, then rename it to its final, unused name."""
    from apm_bench.reporting.view.page import write_run_page  # the viewer reads run folders: import it late

    root = Path(result.config.out)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    created = datetime.now(timezone.utc)
    run_id = free_name(root, new_run_id(result, created))
    staging = root / f".tmp-{run_id}-{os.getpid()}"
    staging.mkdir()
    try:
        config = result.config.model_dump(mode="json")
        config["pool_members"] = result.pool_members
        config["versions"] = package_versions()
        config["git_revision"] = git_revision()
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        result.samples.to_parquet(staging / "samples.parquet", index=False)
        if result.users is not None:
            result.users.to_parquet(staging / "users.parquet", index=False)
        record = RunRecord(
            run_id=run_id,
            created=created.isoformat(timespec="seconds"),
            model=result.config.model,
            methods=list(dict.fromkeys(result.samples["method"])),
            worlds=list(result.config.worlds),
            population=result.population_source,
            wall_seconds=round(wall_seconds, 2),
            metrics=result.metrics,
            costs=result.costs,
            training=[training_summary(entry) for entry in result.training],
            artifacts=_copy_artifacts(result, staging),
            label_diagnostics=result.label_diagnostics,
        )
        if result.training:
            (staging / "training.json").write_text(json.dumps(result.training, indent=2) + "\n", encoding="utf-8")
            plot_training(result.training, staging / "training.png")
        (staging / "metrics.json").write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
        plot_deltas(result.metrics, staging / "delta.png")
        (staging / "report.md").write_text(render_report(result, record.run_id, record.wall_seconds), encoding="utf-8")
        write_run_page(staging)
        final = publish(staging, root, run_id)
    except OSError as exc:  # a full disk, a folder that vanished: say so; nothing half-written stays
        shutil.rmtree(staging, ignore_errors=True)
        raise ApmError(f"cannot write the run into {root}: {exc.strerror or exc}; nothing was kept there and "
                       f"earlier runs are untouched; every call is cached, so a rerun once it can write is quick") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.name != run_id:  # a concurrent run took the name in the meantime: the record follows the folder
        record.run_id = final.name
        (final / "metrics.json").write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
        write_run_page(final)
    return final
