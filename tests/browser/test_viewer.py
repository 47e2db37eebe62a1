"""`apm view`'s pages in a real browser: what a reader clicks must show what the run recorded.

Two small simulator runs are laid out like results/suite/<setting>/<run>/; every expectation is read
back from their samples.parquet / users.parquet (or the leaderboard's own table), never typed in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.reporting import leaderboard as board
from apm_bench.reporting.results import write_run
from apm_bench.reporting.view import page as pages
from apm_bench.reporting.view import run_data
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark

pytestmark = pytest.mark.browser

STATUS = re.compile(r"showing (\d+)–(\d+) of (\d+) users")


# ---------------------------------------------------------------- fixtures: runs and pages
@pytest.fixture(scope="session")
def suite(embedder: HistoryEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/suite/ with two settings: routing + rag over two worlds, and history on one dense-mapping world."""
    root = tmp_path_factory.mktemp("browser") / "results" / "suite"
    configs = [
        RunConfig(methods=["routing", "rag"], worlds=[0, 1], users=60, history_len=3, cache=None,
                  bootstrap_resamples=200, out=root / "sim-large__permutation__nattr1"),
        RunConfig(methods=["history"], worlds=[0], users=40, history_len=3, mapping="dense", cache=None,
                  bootstrap_resamples=200, out=root / "sim-large__dense__nattr1"),
    ]
    for config in configs:
        write_run(run_benchmark(config, embedder=embedder), 1.0)
    return root


@pytest.fixture(scope="session")
def run_folder(suite: Path) -> Path:
    (folder,) = (suite / "sim-large__permutation__nattr1").iterdir()
    return folder


@pytest.fixture(scope="session")
def samples(run_folder: Path) -> pd.DataFrame:
    return pd.read_parquet(run_folder / "samples.parquet")


@pytest.fixture(scope="session")
def users(run_folder: Path) -> pd.DataFrame:
    return pd.read_parquet(run_folder / "users.parquet")


@pytest.fixture(scope="session")
def paged_page(run_folder: Path) -> Path:
    """The same run as a large run's page: 10 users a page, 8 per chunk, data in paged_files/ beside it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_data, "PAGE_SIZE", 10)
        patch.setattr(run_data, "CHUNK_USERS", 8)
        patch.setattr(pages, "INLINE_LIMIT_BYTES", 0)
        page = pages.write_run_page(run_folder, run_folder / "paged.html")
    assert (run_folder / "paged_files" / "users-0003.js").is_file()
    return page


# ---------------------------------------------------------------- helpers
def _wait(driver: Any, condition: Any, timeout: float = 10) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _open(driver: Any, page: Path, fragment: str = "") -> None:
    """A fresh load (not a same-page hash change), so every test starts from the page's defaults."""
    driver.get("about:blank")
    driver.get(page.as_uri() + fragment)
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.kind"))


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _one(driver: Any, selector: str) -> Any:
    found = _css(driver, selector)
    assert len(found) == 1, f"{selector}: {len(found)} elements"
    return found[0]


def _text(element: Any) -> str:
    return element.get_property("textContent")


def _select(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(_one(driver, f"#{element_id}")).select_by_value(value)


def _listed(driver: Any) -> list[tuple[int, str]]:
    return [(int(r.get_attribute("data-world")), r.get_attribute("data-user")) for r in _css(driver, "#sample-list tr.sample-row")]


def _status(driver: Any) -> tuple[int, int, int]:
    found = STATUS.fullmatch(_one(driver, "#page-status").text)
    assert found, _one(driver, "#page-status").text
    return tuple(int(x) for x in found.groups())  # type: ignore[return-value]


def _show_samples(driver: Any) -> None:
    _one(driver, "#tab-samples").click()
    _wait(driver, lambda d: _css(d, "#sample-list tr.sample-row"))


def _open_user(driver: Any, world: int, user: str) -> None:
    _wait(driver, lambda d: _css(d, f'#user-view[data-world="{world}"][data-user="{user}"] .method-column'))


def _row(samples: pd.DataFrame, world: int, user: str, method: str) -> Any:
    (row,) = samples[(samples["world"] == world) & (samples["user_id"] == user) & (samples["method"] == method)].itertuples()
    return row


def _top_label(targets: Any) -> str:
    top = max(targets, key=lambda t: abs(float(t["weight"])))
    return f"{top['side']} {top['principle']}"


def _check_column(driver: Any, row: Any) -> None:
    """One method's column says what samples.parquet says: prompt sent, response, ratings, reward."""
    column = _one(driver, f'.method-column[data-method="{row.method}"]')
    assert _text(column.find_element("css selector", ".response")) == row.response
    assert _text(column.find_element("css selector", ".system-prompt")) == (row.system_prompt or "(none)")
    shown = column.find_elements("css selector", ".rating")
    assert [r.get_attribute("data-principle") for r in shown] == [t["principle"] for t in row.targets]
    for cell, value in zip(shown, row.ratings):
        if pd.isna(value):
            assert _text(cell) == "failed"
        else:
            assert float(_text(cell)) == pytest.approx(value, abs=0.006)
    assert float(_text(column.find_element("css selector", ".reward"))) == pytest.approx(row.reward, abs=0.006)


# ---------------------------------------------------------------- run page
def test_routing_losses_listed_and_a_user_shown_side_by_side(driver, run_folder, samples, users, screenshot) -> None:
    page = run_folder / "report.html"
    _open(driver, page)
    assert _one(driver, "#simulator-badge").is_displayed()
    record = json.loads((run_folder / "metrics.json").read_text(encoding="utf-8"))
    pooled = [m["method"] for m in record["metrics"] if m["world"] == "pooled" and m["method"] != "baseline"]
    assert [g.get_attribute("data-method") for g in _css(driver, "#delta-plot g.forest-row")] == pooled
    assert [r.get_attribute("data-method") for r in _css(driver, "#pooled-table tbody tr")] == pooled
    screenshot("run-page")

    _show_samples(driver)
    _select(driver, "filter-method", "routing")
    _select(driver, "filter-outcome", "loss")
    routing = samples[samples["method"] == "routing"]
    losses = routing[routing["reward"] < routing["baseline_reward"]]
    assert len(losses) > 0, "the run should have routing losses to list"
    _wait(driver, lambda d: _status(d)[2] == len(losses))
    assert _status(driver) == (1, len(losses), len(losses))
    assert sorted(_listed(driver)) == sorted(zip(losses["world"], losses["user_id"]))

    world, user = _listed(driver)[0]
    _css(driver, "#sample-list tr.sample-row")[0].click()
    _open_user(driver, world, user)
    assert unquote(urlparse(driver.current_url).fragment) == f"user/{world}/{user}"
    history = users[(users["world"] == world) & (users["user_id"] == user)]["history"].iloc[0]
    assert [_text(li) for li in _css(driver, "#user-history li")] == list(history)
    assert _text(_one(driver, "#user-prompt")) == _row(samples, world, user, "routing").prompt
    for method in ("baseline", "routing"):
        _check_column(driver, _row(samples, world, user, method))
    assert float(_text(_one(driver, '.method-column[data-method="routing"] .delta'))) < 0  # a loss, as filtered
    screenshot("user-page")

    driver.back()  # Back leaves the user for the filtered list, as it was
    _wait(driver, lambda d: _one(d, "#panel-samples").is_displayed())
    assert sorted(_listed(driver)) == sorted(zip(losses["world"], losses["user_id"]))


def test_evaluation_view_reveals_hidden_targets_and_survives_moving_between_users(driver, run_folder, samples, users, screenshot) -> None:
    routing = samples[samples["method"] == "routing"]
    order = list(dict.fromkeys(zip(samples["world"], samples["user_id"])))
    first, second = (_row(routing, world, user, "routing") for world, user in order[:2])
    _open(driver, run_folder / "report.html", f"#user/{first.world}/{first.user_id}")
    _open_user(driver, first.world, first.user_id)
    toggle = _one(driver, "#eval-toggle")
    hidden = ("#eval-panel", '.method-column[data-method="routing"] .routing-check')
    assert not toggle.is_selected(), "the evaluation view is off by default"
    assert not any(_one(driver, s).is_displayed() for s in hidden)

    toggle.click()
    assert all(_one(driver, s).is_displayed() for s in hidden)
    assert _one(driver, "#true-label").text == _top_label(first.targets)
    shown = [(r.get_attribute("data-principle"), r.find_elements("css selector", "td")[1].text) for r in _css(driver, "#user-targets tr.target")]
    assert shown == [(t["principle"], t["side"]) for t in first.targets]
    attributes = users[(users["world"] == first.world) & (users["user_id"] == first.user_id)]["attributes"].iloc[0]
    assert all(f"{a['side']} {a['attribute']}" in _one(driver, "#user-attributes").text for a in attributes)
    check = _one(driver, '.method-column[data-method="routing"] .routing-check')
    assert first.routed_to in check.text
    assert check.get_attribute("data-correct") == str(first.routed_to == _top_label(first.targets)).lower()

    toggle.click()
    assert not any(_one(driver, s).is_displayed() for s in hidden)
    toggle.click()

    _one(driver, "#next-user").click()  # the next user of the (unfiltered) list
    _open_user(driver, second.world, second.user_id)
    assert _one(driver, "#eval-toggle").is_selected()
    assert _one(driver, "#eval-panel").is_displayed()
    assert _one(driver, "#true-label").text == _top_label(second.targets)
    screenshot("user-page-evaluation-view")


def test_paging_through_users_loaded_from_files_beside_the_page(driver, paged_page, samples) -> None:
    order = list(dict.fromkeys(zip(samples["world"], samples["user_id"])))
    assert len(order) > 20
    _open(driver, paged_page, "#samples")
    _wait(driver, lambda d: _css(d, "#sample-list tr.sample-row"))
    assert _status(driver) == (1, 10, len(order)) and _listed(driver) == order[:10]
    assert not _one(driver, "#prev-page").is_enabled()

    _one(driver, "#next-page").click()
    assert _status(driver) == (11, 20, len(order)) and _listed(driver) == order[10:20]
    _one(driver, "#prev-page").click()
    assert _status(driver) == (1, 10, len(order)) and _listed(driver) == order[:10]
    while _one(driver, "#next-page").is_enabled():
        _one(driver, "#next-page").click()
    last = (len(order) - 1) // 10 * 10
    assert _status(driver) == (last + 1, len(order), len(order)) and _listed(driver) == order[last:]

    world, user = order[-1]  # the last chunk file: loaded only now
    _css(driver, "#sample-list tr.sample-row")[-1].click()
    _open_user(driver, world, user)
    _check_column(driver, _row(samples, world, user, "rag"))


# ---------------------------------------------------------------- leaderboard and runs list
def _deltas(table: Any) -> list[float]:
    return [float(r.find_elements("css selector", "td")[1].text) for r in table.find_elements("css selector", "tbody tr")]


def test_leaderboard_sorts_by_delta_and_links_to_run_pages(driver, suite, screenshot) -> None:
    out = suite.parent / "index.html"
    pages.write_leaderboard_page(suite, out)
    frame = board.collect(suite)
    _open(driver, out)
    tables = _css(driver, "#leaderboard table")
    assert len(tables) == frame.groupby(board.SETTING).ngroups == 2
    assert len(_css(driver, "#leaderboard .badge.sim")) == 2

    for table in tables:
        header = table.find_element("css selector", 'th[data-key="delta"]')
        before = sorted(_deltas(table))
        header.click()
        assert header.get_attribute("data-sort") == "desc" and _deltas(table) == sorted(before, reverse=True)
        header.click()
        assert header.get_attribute("data-sort") == "asc" and _deltas(table) == before
    shown = sorted(d for table in tables for d in _deltas(table))
    assert shown == pytest.approx(sorted(frame["delta"]), abs=0.006)
    screenshot("leaderboard")

    links = _css(driver, "#leaderboard a.run-link")
    assert len(links) == len(frame)
    targets = {Path(unquote(urlparse(a.get_attribute("href")).path)) for a in links}
    assert all(t.is_file() and t.name == "report.html" for t in targets) and len(targets) == 2
    links[0].click()
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.kind") == "run")
    assert _css(driver, "#pooled-table tbody tr")


def test_runs_list_links_every_run(driver, suite) -> None:
    out = pages.write_page(suite)
    _open(driver, out)
    rows = _css(driver, "#runs-table tbody tr")
    folders = {p.parent.name for p in suite.rglob("metrics.json")}
    assert {r.get_attribute("data-run") for r in rows} == folders
    for link in _css(driver, "#runs-table a.run-link"):
        assert Path(unquote(urlparse(link.get_attribute("href")).path)).is_file()
