"""Headless Chromium for the viewer's browser tests: one driver per session, console checked after each test.

The driver never touches the network: chromedriver and Chromium are found on PATH (Selenium Manager would
otherwise try to download them). Without them, or without selenium, every browser test skips and says why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def _missing() -> str | None:
    """Why the browser suite cannot run here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if _chromium() is None:
        return "no Chromium on PATH (apt-get install chromium)"
    if shutil.which("chromedriver") is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI") == "true":  # CI installs Chromium (.ci/run): its absence there is a failure, not a skip
        raise pytest.UsageError(f"CI must run the browser tests, but {reason}")
    skip = pytest.mark.skip(reason=f"browser tests need a local headless Chromium: {reason}")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $APM_BROWSER_ARTIFACTS, else test-artifacts/browser/ in the checkout."""
    folder = Path(os.environ.get("APM_BROWSER_ARTIFACTS") or REPO / "test-artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def _session_driver() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium() or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def severe_entries(driver: Any) -> list[str]:
    """Console errors since the last read (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


@pytest.fixture()
def driver(_session_driver: Any) -> Iterator[Any]:
    """The shared browser, its console emptied before the test and checked for errors after it."""
    severe_entries(_session_driver)
    yield _session_driver
    errors = severe_entries(_session_driver)
    assert not errors, "console errors:\n" + "\n".join(errors)


@pytest.fixture()
def screenshot(driver: Any, artifacts: Path):  # type: ignore[no-untyped-def]
    """Saves the whole page as <artifacts>/<name>.png (the window grows to the page's height first)."""

    def save(name: str) -> Path:
        size = driver.get_window_size()
        # the window's height includes the browser's own bars: the page gets what is left of it
        page, bars = driver.execute_script(
            "return [Math.min(document.documentElement.scrollHeight, 8000), window.outerHeight - window.innerHeight]")
        driver.set_window_size(size["width"], max(size["height"], int(page) + int(bars)))
        path = artifacts / f"{name}.png"
        try:
            driver.save_screenshot(str(path))
        finally:
            driver.set_window_size(size["width"], size["height"])
        return path

    return save
