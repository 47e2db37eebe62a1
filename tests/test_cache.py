"""The persistent call cache: storage, claims, failures, and whole runs that resume or share it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apm_bench.cache import CacheStats, CallCache, cache_key


def test_values_are_computed_once_and_reused(tmp_path: Path) -> None:
    cache = CallCache(tmp_path / "c.sqlite")
    calls: list[list[int]] = []

    def compute(indices: list[int]) -> list[object]:
        calls.append(indices)
        return [{"v": i * 10} for i in indices]

    keys = ["a", "b", "a", "c"]
    stats = CacheStats()
    assert cache.get_or_compute(keys, "t", compute, stats) == [{"v": 0}, {"v": 10}, {"v": 0}, {"v": 30}]
    assert sorted(i for batch in calls for i in batch) == [0, 1, 3]  # the duplicate key is computed once
    again = CacheStats()
    assert cache.get_or_compute(keys, "t", compute, again) == [{"v": 0}, {"v": 10}, {"v": 0}, {"v": 30}]
    assert len(calls) == 1 and again.hits == 4 and again.misses == 0
    assert set(cache.computations().values()) == {1}


def test_failures_are_never_stored(tmp_path: Path) -> None:
    cache = CallCache(tmp_path / "c.sqlite")
    first = cache.get_or_compute(["ok", "bad"], "t", lambda idx: [1 if i == 0 else None for i in idx])
    assert first == [1, None]
    assert cache.stored(["ok", "bad"]) == {"ok": 1}
    second = cache.get_or_compute(["ok", "bad"], "t", lambda idx: [2 for _ in idx])
    assert second == [1, 2]  # the failed one was asked again


def test_an_exception_releases_claims(tmp_path: Path) -> None:
    cache = CallCache(tmp_path / "c.sqlite")

    def boom(indices: list[int]) -> list[object]:
        raise RuntimeError("engine down")

    with pytest.raises(RuntimeError):
        cache.get_or_compute(["k"], "t", boom)
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert rows == 0
    assert cache.get_or_compute(["k"], "t", lambda idx: ["fine"]) == ["fine"]


def test_claims_of_a_dead_process_are_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = CallCache(path, owner=f"{os.uname().nodename}:{int(dead.stdout)}:ghost")
    ghost._claim(["k"], "t")  # claimed, never answered: its process is gone
    assert CallCache(path).get_or_compute(["k"], "t", lambda idx: ["mine"]) == ["mine"]


def test_a_live_claim_is_waited_for_not_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    slow = CallCache(path)
    fast = CallCache(path, poll_seconds=0.01)
    started = threading.Event()
    computed: list[str] = []

    def slow_compute(indices: list[int]) -> list[object]:
        started.set()
        time.sleep(0.5)
        computed.append("slow")
        return ["from slow"]

    worker = threading.Thread(target=lambda: slow.get_or_compute(["k"], "t", slow_compute))
    worker.start()
    started.wait(5)
    stats = CacheStats()
    result = fast.get_or_compute(["k"], "t", lambda idx: computed.append("fast") or ["from fast"], stats)
    worker.join()
    assert result == ["from slow"] and computed == ["slow"] and stats.waited == 1


def test_keys_do_not_depend_on_dict_order() -> None:
    assert cache_key({"a": 1, "b": 2}, [1]) == cache_key({"b": 2, "a": 1}, [1])
    assert cache_key({"a": 1}) != cache_key({"a": 2})


# --------------------------------------------------------------------------- whole runs

RUN = ["run", "--method", "routing", "--users", "120", "--worlds", "2", "--history-len", "2"]


def _apm(args: list[str], cwd: Path, batch: str = "64") -> subprocess.Popen:
    env = {**os.environ, "APM_CACHE_BATCH": batch}
    return subprocess.Popen([sys.executable, "-m", "apm_bench.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(out: Path) -> list[dict]:
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return json.loads((folder / "metrics.json").read_text())["metrics"]


def _stored(cache: Path) -> int:
    """Stored answers; 0 while the run that creates the file has not created its table yet."""
    try:
        with sqlite3.connect(cache, timeout=30) as connection:
            return connection.execute("SELECT COUNT(*) FROM calls WHERE value IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise


def _max_computations(cache: Path) -> int:
    with sqlite3.connect(cache, timeout=30) as connection:
        return connection.execute("SELECT MAX(computations) FROM calls").fetchone()[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], int]:
    """An uninterrupted run on its own cache: its metrics and how many calls it stored."""
    work = tmp_path_factory.mktemp("reference")
    proc = _apm([*RUN, "--cache", str(work / "c.sqlite"), "--out", str(work / "out")], work)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return _metrics(work / "out"), _stored(work / "c.sqlite")


def test_a_killed_run_resumes_with_identical_metrics(tmp_path: Path, reference: tuple[list[dict], int]) -> None:
    cache = tmp_path / "c.sqlite"
    args = [*RUN, "--cache", str(cache), "--out", str(tmp_path / "out")]
    victim = _apm(args, tmp_path, batch="16")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not cache.exists() or _stored(cache) < 400):
        assert victim.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    victim.kill()  # SIGKILL: no cleanup of any kind
    victim.wait()
    stored_before = _stored(cache)
    assert 400 <= stored_before < reference[1]
    assert not [p for p in (tmp_path / "out").glob("*") if not p.name.startswith(".")] if (tmp_path / "out").exists() else True

    rerun = _apm(args, tmp_path)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert _metrics(tmp_path / "out") == reference[0]
    assert _stored(cache) == reference[1]
    assert _max_computations(cache) == 1  # nothing that was cached was computed again


def test_two_runs_share_one_cache_at_once(tmp_path: Path, reference: tuple[list[dict], int]) -> None:
    cache = tmp_path / "c.sqlite"
    first = _apm([*RUN, "--cache", str(cache), "--out", str(tmp_path / "a")], tmp_path)
    second = _apm([*RUN, "--cache", str(cache), "--out", str(tmp_path / "b")], tmp_path)
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    assert _metrics(tmp_path / "a") == reference[0]
    assert _metrics(tmp_path / "b") == reference[0]
    assert _stored(cache) == reference[1]
    assert _max_computations(cache) == 1


def test_a_full_disk_is_reported_as_such_and_leaves_no_claimed_empty_rows(tmp_path: Path) -> None:
    """sqlite's page limit stands in for a full disk: the same SQLITE_FULL error, on any machine."""
    from apm_bench.errors import CacheError

    cache = CallCache(tmp_path / "calls.sqlite")
    cache.get_or_compute(["small"], "test", lambda idx: ["fits"])
    pages = cache._connection.execute("PRAGMA page_count").fetchone()[0]
    cache._connection.execute(f"PRAGMA max_page_count = {pages + 2}")
    big = ["x" * 20_000 for _ in range(20)]
    with pytest.raises(CacheError, match="database or disk is full; free some space"):
        cache.get_or_compute([f"big-{i}" for i in range(20)], "test", lambda idx: [big[i] for i in idx])
    left = cache._connection.execute("SELECT COUNT(*) FROM calls WHERE value IS NULL").fetchone()[0]
    assert left == 0  # the claims were released, not left for other runs to wait on
    assert cache.stored(["small"]) == {"small": "fits"}  # what was stored before is intact
    cache.close()


@pytest.mark.parametrize("case", ["folder", "foreign file", "damaged", "under a file"])
def test_an_unusable_cache_path_is_one_clear_error_before_any_call(tmp_path: Path, case: str) -> None:
    from apm_bench.errors import CacheError

    path = tmp_path / "calls.sqlite"
    if case == "folder":
        path.mkdir()
    elif case == "foreign file":
        path.write_text("not a database\n")
    elif case == "damaged":
        good = CallCache(path)
        good.get_or_compute([f"k{i}" for i in range(200)], "test", lambda idx: ["v" * 500 for _ in idx])
        good.close()
        data = bytearray(path.read_bytes())
        data[4096 : 4096 + 12] = b"\xff" * 12  # scribble over the second page's b-tree header
        path.write_bytes(bytes(data))
    else:
        (tmp_path / "a-file").write_text("x")
        path = tmp_path / "a-file" / "calls.sqlite"
    with pytest.raises(CacheError, match=str(path)):
        CallCache(path)
