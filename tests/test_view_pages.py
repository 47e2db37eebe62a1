"""`apm view`'s pages, read back as data: what the browser is given must be what the run recorded.

The browser suite (tests/browser) drives these pages in Chromium; here the payloads themselves are
checked against samples.parquet and users.parquet, without a browser.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.reporting import leaderboard as board
from apm_bench.reporting.results import write_run
from apm_bench.reporting.view import page as pages
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from tests.test_cli import apm_inline


@pytest.fixture(scope="module")
def run_folder(embedder: HistoryEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("view") / "runs"
    config = RunConfig(methods=["routing", "history"], worlds=[0, 1], users=60, history_len=3, cache=None,
                       bootstrap_resamples=200, out=out)
    return write_run(run_benchmark(config, embedder=embedder), 1.0)


def _payload(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="apm-data">(.*?)</script>', html, re.S)
    assert found, "the page carries no payload"
    return json.loads(found.group(1))


def _calls(text: str, name: str) -> list[list]:
    """The arguments of every `window.<name>(…);` call in a page or a sidecar file."""
    return [json.loads(f"[{m.group(1)}]") for m in re.finditer(rf"window\.{name}\((.*?)\);(?:</script>|$)", text, re.S | re.M)]


def _users(html_or_files: list[str]) -> list[dict]:
    chunks = sorted((c for text in html_or_files for c in _calls(text, "apmChunk")), key=lambda c: c[0])
    return [user for _, users in chunks for user in users]


def test_apm_run_writes_a_self_contained_page_with_every_sample(run_folder: Path) -> None:
    html = (run_folder / "report.html").read_text(encoding="utf-8")
    payload = _payload(html)
    assert payload["kind"] == "run" and payload["simulated"] and payload["samples"]["available"]
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"?https?:", html), "the page loads something from the web"
    assert not (run_folder / "report_files").exists(), "a small run's data belongs inside its page"
    samples = pd.read_parquet(run_folder / "samples.parquet")
    users = _users([html])
    assert len(users) == samples.groupby(["world", "user_id"]).ngroups == payload["samples"]["users"]
    for row in samples.sample(40, random_state=0).itertuples():
        user = next(u for u in users if u["world"] == row.world and u["user_id"] == row.user_id)
        shown = user["samples"][row.method]
        assert shown["response"] == row.response and shown["system_prompt"] == row.system_prompt
        assert shown["ratings"] == [None if pd.isna(r) else r for r in row.ratings]
        assert shown["delta"] == pytest.approx(row.reward - row.baseline_reward)
        assert user["prompt"] == row.prompt


def test_the_index_filters_what_the_samples_say(run_folder: Path) -> None:
    html = (run_folder / "report.html").read_text(encoding="utf-8")
    (index,) = _calls(html, "apmIndex")[0]
    samples = pd.read_parquet(run_folder / "samples.parquet")
    routing = samples[samples["method"] == "routing"]
    losses = routing[routing["reward"] < routing["baseline_reward"]]
    indexed = {(w, u) for w, u, d in zip(index["world"], index["user_id"], index["delta"]["routing"]) if d is not None and d < 0}
    assert indexed == set(zip(losses["world"], losses["user_id"]))
    assert set(index["delta"]) == {"oracle", "prior", "routing", "history"}
    top = {(w, u): t for w, u, t in zip(index["world"], index["user_id"], index["top"])}
    for row in routing.head(20).itertuples():
        assert top[(row.world, row.user_id)] == max(row.targets, key=lambda t: abs(t["weight"]))["principle"]


def test_a_user_carries_the_history_methods_saw_and_the_hidden_attributes(run_folder: Path) -> None:
    users = _users([(run_folder / "report.html").read_text(encoding="utf-8")])
    recorded = pd.read_parquet(run_folder / "users.parquet")
    assert len(recorded) == len(users)
    for row in recorded.head(15).itertuples():
        user = next(u for u in users if u["world"] == row.world and u["user_id"] == row.user_id)
        assert user["history"] == list(row.history) and len(user["history"]) == 3
        assert user["attributes"] == [dict(a) for a in row.attributes] and user["attributes"]
        assert user["true_label"] == "{side} {principle}".format(**max(user["targets"], key=lambda t: abs(t["weight"])))
        assert user["samples"]["routing"]["routed_to"], "routing records the label it chose"


def test_a_large_run_pages_its_users_from_files_beside_the_page(run_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shutil.copytree(run_folder, tmp_path / "run")
    monkeypatch.setattr(pages, "INLINE_LIMIT_BYTES", 1000)
    page = pages.write_run_page(folder)
    html = page.read_text(encoding="utf-8")
    payload = _payload(html)
    files = folder / "report_files"
    assert not _calls(html, "apmChunk") and not _calls(html, "apmIndex")
    assert payload["samples"]["index_src"] == "report_files/index.js"
    chunks = sorted(files.glob("users-*.js"))
    assert [p.name for p in chunks] == [payload["samples"]["chunk_src"].format(n=f"{n:04d}").split("/")[1]
                                        for n in range(len(chunks))]
    inline = _users([(run_folder / "report.html").read_text(encoding="utf-8")])
    assert _users([p.read_text(encoding="utf-8") for p in chunks]) == inline
    assert len(chunks) == -(-len(inline) // 50)
    monkeypatch.setattr(pages, "INLINE_LIMIT_BYTES", 10**9)
    pages.write_run_page(folder)
    assert not files.exists(), "a page that carries its data again drops the stale sidecar"


def test_text_that_looks_like_markup_cannot_break_out_of_the_page(run_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(run_folder, tmp_path / "run")
    samples = pd.read_parquet(folder / "samples.parquet")
    hostile = "</script><script>alert(1)</script><!--"
    samples.loc[0, "response"] = hostile
    samples.to_parquet(folder / "samples.parquet", index=False)
    html = pages.write_run_page(folder).read_text(encoding="utf-8")
    assert "alert(1)</script>" not in html and "<!--" not in html
    assert hostile in json.dumps(_users([html]), ensure_ascii=False)


def test_an_older_run_folder_opens_with_what_it_has(run_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(run_folder, tmp_path / "old")
    (folder / "users.parquet").unlink()
    payload = _payload(pages.write_run_page(folder).read_text(encoding="utf-8"))
    assert payload["samples"]["available"] and payload["samples"]["has_history"] is False
    (folder / "samples.parquet").unlink()
    payload = _payload(pages.write_run_page(folder).read_text(encoding="utf-8"))
    assert payload["samples"] == {"available": False, "reason": "this run folder has no samples.parquet"}
    assert [m["method"] for m in payload["metrics"] if m["world"] == "pooled"][:2] == ["baseline", "oracle"]


def test_the_leaderboard_page_links_every_row_to_its_run(run_folder: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    for setting in ("a", "b"):
        shutil.copytree(run_folder, results / "suite" / setting / run_folder.name)
    (results / "suite" / "b" / run_folder.name / "report.html").unlink()
    board.build(results / "suite", results)
    page = pages.write_page(results)
    assert page == results / "index.html"
    payload = _payload(page.read_text(encoding="utf-8"))
    frame = board.collect(results / "suite")
    assert payload["kind"] == "leaderboard"
    assert sum(len(s["rows"]) for s in payload["settings"]) == len(frame)
    names = {shown: raw for raw, shown in board.REFERENCE_NAMES.items()}
    for setting in payload["settings"]:
        assert setting["simulated"] and "(simulator)" in setting["title"]
        for row in setting["rows"]:
            assert (results / row["href"]).is_file(), f"{row['href']} does not exist"
            expected = frame[frame["method"] == names.get(row["method"], row["method"])]
            assert row["delta"] == pytest.approx(expected["delta"].iloc[0])
            assert row["ci_low"] <= row["delta"] <= row["ci_high"]


def test_a_folder_of_runs_lists_them_newest_first(run_folder: Path) -> None:
    payload = _payload(pages.write_page(run_folder.parent).read_text(encoding="utf-8"))
    assert payload["kind"] == "runs"
    assert [r["run_id"] for r in payload["runs"]] == [run_folder.name]
    assert (run_folder.parent / payload["runs"][0]["href"]).is_file()
    assert {r["method"] for r in payload["runs"][0]["pooled"]} == {"oracle", "prior", "routing", "history"}


def test_apm_view_refuses_what_is_not_a_run_or_results_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    for path, message in ((tmp_path / "absent", "does not exist"), (tmp_path / "notes.txt", "is a file"),
                          (tmp_path, "no run folders")):
        completed = apm_inline("view", str(path), cwd=tmp_path)
        assert completed.returncode == 2, completed.stderr
        assert completed.stderr.startswith("error: ") and message in completed.stderr
        assert len(completed.stderr.strip().splitlines()) == 1


def test_apm_view_writes_a_run_page_where_asked(run_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages" / "run.html"
    out.parent.mkdir()
    completed = apm_inline("view", str(run_folder), "--out", str(out), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert _payload(out.read_text(encoding="utf-8"))["run_id"] == run_folder.name


def test_a_served_page_and_its_files_come_from_loopback_only(run_folder: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import urllib.request

    from apm_bench.reporting.view.serve import page_server

    folder = shutil.copytree(run_folder, tmp_path / "run")
    monkeypatch.setattr(pages, "INLINE_LIMIT_BYTES", 1000)
    page = pages.write_run_page(folder)
    with page_server(page, 0) as server:
        host, port = server.server_address[:2]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            assert host == "127.0.0.1"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/report.html", timeout=10) as reply:
                assert _payload(reply.read().decode("utf-8"))["run_id"] == run_folder.name
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/report_files/index.js", timeout=10) as reply:
                assert reply.read() == (folder / "report_files" / "index.js").read_bytes()
        finally:
            server.shutdown()
            thread.join(5)
