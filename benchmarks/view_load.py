"""How heavy a run's page is and how fast headless Chromium opens it.

    python benchmarks/view_load.py RUN_FOLDER [RUN_FOLDER ...] [--repeats 3]

For each run folder it (re)writes the page, then reports the bytes the browser must read to show
the page at its sample browser (the HTML; the sidecar folder's total is reported apart, since only the index and one
chunk per opened user are read), and the median over fresh page loads of: the load event, the
first page of the sample browser drawn, and one user opened. Needs Debian's chromium and
chromium-driver (the same as the browser tests).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from apm_bench.reporting.view.page import write_run_page


def driver() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)


def one_load(browser: webdriver.Chrome, page: Path) -> dict[str, float]:
    browser.get("about:blank")
    started = time.perf_counter()
    browser.get(page.resolve().as_uri() + "#samples")
    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#sample-list tr.sample-row"))
    listed = time.perf_counter() - started
    load_event = browser.execute_script(
        "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;") / 1000
    before = time.perf_counter()
    browser.find_elements(By.CSS_SELECTOR, "#sample-list tr.sample-row")[0].click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".method-column .response"))
    return {"load_event_s": load_event, "sample_list_s": listed, "open_user_s": time.perf_counter() - before}


def measure(folder: Path, repeats: int) -> dict[str, object]:
    started = time.perf_counter()
    page = write_run_page(folder)
    written = time.perf_counter() - started
    sidecar = page.with_name(f"{page.stem}_files")
    files = list(sidecar.glob("*")) if sidecar.is_dir() else []
    browser = driver()
    try:
        loads = [one_load(browser, page) for _ in range(repeats)]
    finally:
        browser.quit()
    return {
        "run": folder.name,
        "page_bytes": page.stat().st_size,
        "sidecar_files": len(files),
        "sidecar_bytes": sum(f.stat().st_size for f in files),
        "index_bytes": (sidecar / "index.js").stat().st_size if sidecar.is_dir() else 0,
        "largest_chunk_bytes": max((f.stat().st_size for f in files if f.name.startswith("users-")), default=0),
        "write_page_s": round(written, 2),
        **{k: round(statistics.median(load[k] for load in loads), 3) for k in loads[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for folder in args.folders:
        print(json.dumps(measure(folder, args.repeats)))


if __name__ == "__main__":
    main()
