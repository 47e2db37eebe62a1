"""Static HTML pages: one file with the viewer's CSS, JS and the page's data inlined, so it opens
offline from disk and can be published as is (GitHub Pages). No server, no CDN.

A run's samples go into the page too when they are small (the default run's page is one file to
mail around). A large run's samples go into `<page>_files/`: an index and chunks of users as
small scripts the page loads when asked, because browsers refuse `fetch()` on `file://` but do
load `<script src>`; so a paper-sized run opens in a moment and pages through its users.
"""

from __future__ import annotations

import json
import os
import shutil
from html import escape
from pathlib import Path
from typing import Any

from apm_bench.errors import ApmError
from apm_bench.reporting.view.overview_data import leaderboard_payload, run_folders, runs_payload
from apm_bench.reporting.view.run_data import RunView, read_run_view

ASSETS = Path(__file__).resolve().parent / "assets"
RUN_PAGE = "report.html"
#: above this much sample data a run's page loads it from `<page>_files/` instead of carrying it
INLINE_LIMIT_BYTES = 3_000_000


def write_run_page(folder: Path, out: Path | None = None) -> Path:
    """`report.html` (or `out`) for the run folder, with its samples inlined or beside it."""
    out = out or folder / RUN_PAGE
    view = read_run_view(folder)
    files = out.with_name(f"{out.stem}_files")
    data = _data_scripts(view)
    if data and sum(len(script) for script in data) > INLINE_LIMIT_BYTES:
        _write_folder(files, {"index.js": data[0], **{_chunk_name(n): s for n, s in enumerate(data[1:])}})
        data = []
    elif files.exists():
        shutil.rmtree(files)  # an earlier, larger page's sidecar: this page no longer needs it
    if view.summary["samples"].get("available"):
        view.summary["samples"].update(index_src=f"{files.name}/index.js", chunk_src=f"{files.name}/users-{{n}}.js")
    _write_text(out, render(view.summary, data))
    return out


def write_runs_page(root: Path, out: Path | None = None) -> Path:
    """A list of the runs under `root`, each linking to its page (written where missing or stale)."""
    out = out or root / "index.html"
    for folder in run_folders(root):
        ensure_run_page(folder)
    _write_text(out, render(runs_payload(root, out, RUN_PAGE)))
    return out


def write_leaderboard_page(runs: Path, out: Path) -> Path:
    """The leaderboard as a sortable page (`results/index.html`), linking each row to its run."""
    payload = leaderboard_payload(runs, out, RUN_PAGE)
    for folder in run_folders(runs):
        ensure_run_page(folder)
    _write_text(out, render(payload))
    return out


def ensure_run_page(folder: Path) -> Path:
    """The run's page, rewritten only when it is missing or older than the run's record."""
    page = folder / RUN_PAGE
    if not page.is_file() or page.stat().st_mtime < (folder / "metrics.json").stat().st_mtime:
        write_run_page(folder)
    return page


def render(payload: dict[str, Any], data_scripts: list[str] | None = None) -> str:
    """The whole page: CSS, the payload as JSON, the viewer and any inlined sample data."""
    css, js = _asset("viewer.css"), _asset("viewer.js")
    inlined = "".join(f"<script>{script}</script>\n" for script in data_scripts or [])
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(str(payload.get('title', 'apm-bench')))}</title>\n<style>\n{css}\n</style>\n</head>\n<body>\n"
        '<div id="app"></div>\n'
        f'<script type="application/json" id="apm-data">{_json(payload)}</script>\n'
        f"<script>\n{js}\n</script>\n{inlined}</body>\n</html>\n"
    )


def _data_scripts(view: RunView) -> list[str]:
    if view.index is None:
        return []
    return [f"window.apmIndex({_json(view.index)});"] + [
        f"window.apmChunk({n}, {_json(chunk)});" for n, chunk in enumerate(view.chunks)]


def _chunk_name(n: int) -> str:
    return f"users-{n:04d}.js"


def _json(value: Any) -> str:
    """JSON safe inside a <script> element: no `<` can close it or open a comment."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _asset(name: str) -> str:
    try:
        return (ASSETS / name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ApmError(f"the viewer's {name} is missing from the installed package ({exc})") from None


def _write_text(path: Path, text: str) -> None:
    """Write beside, then rename: a reader never sees half a page, and a failed write keeps the old one."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(text, encoding="utf-8")
        staging.replace(path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise ApmError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_folder(folder: Path, files: dict[str, str]) -> None:
    """Fill a fresh folder, then swap it in for the old one."""
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ApmError(f"cannot write {folder}: {exc.strerror or exc}") from None


def write_page(path: Path, out: Path | None = None) -> Path:
    """The page `apm view PATH` means: a run folder's, a results folder's leaderboard (it holds
    LEADERBOARD.md, its runs under suite/), or a list of the runs under a folder."""
    if not path.exists():
        raise ApmError(f"{path} does not exist")
    if path.is_file():
        raise ApmError(f"{path} is a file; give a run folder, a results folder or a folder of runs")
    if (path / "metrics.json").is_file():
        return write_run_page(path, out)
    if (path / "LEADERBOARD.md").is_file() and (path / "suite").is_dir():
        return write_leaderboard_page(path / "suite", out or path / "index.html")
    return write_runs_page(path, out)
