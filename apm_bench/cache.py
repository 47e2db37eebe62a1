"""The persistent call cache: every generation, rating and embedding of a run, keyed by what
determines it, in one sqlite file (WAL) that several runs may share at once.

- A killed run resumes: what it stored is reused, what it had claimed but not stored is taken
  over once its owner is gone.
- Two concurrent runs never compute the same call twice: a run *claims* the keys it is about to
  compute (an atomic insert), and a run that finds a key claimed by a live process waits for
  that process's answer instead of computing it too.
- Failures are never stored: a failed computation releases its claims and nothing is cached.
- Each stored row counts how often it was computed (`computations`), so tests can prove that
  no call was made twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apm_bench.errors import CacheError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT,
    owner TEXT,
    claimed_at REAL,
    computations INTEGER NOT NULL DEFAULT 0
)
"""
_CHUNK = 500
STALE_CLAIM_SECONDS = 1800.0


def cache_key(*parts: Any) -> str:
    """A stable key from JSON-able parts (sorted keys, so dict order never matters)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    waited: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_waited": self.waited}


@dataclass
class CallCache:
    path: Path
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    poll_seconds: float = 0.05
    #: keys claimed and computed at a time: large enough to batch an engine, small enough that a
    #: killed run loses little and concurrent runs share the work
    batch_size: int = field(default_factory=lambda: int(os.environ.get("APM_CACHE_BATCH", "512")))

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        _check_location(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._fault("open"):
            self._connection = sqlite3.connect(self.path, timeout=120.0, isolation_level=None, check_same_thread=False)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute(_SCHEMA)
            damage = self._connection.execute("PRAGMA quick_check").fetchone()[0]
        if damage != "ok":
            raise CacheError(f"call cache {self.path} is damaged ({damage}); delete it or choose another with --cache")

    @contextmanager
    def _fault(self, doing: str) -> Iterator[None]:
        """sqlite's errors as one line naming the cache and the real cause (a full disk, a damaged or
        foreign file), never a traceback or a secondary error that hides the first."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            cause = str(exc)
            hint = ("free some space or point --cache at another disk" if "full" in cause
                    else "delete it or choose another file with --cache")
            raise CacheError(f"call cache {self.path}: cannot {doing}: {cause}; {hint}") from None

    def _rollback(self) -> None:
        """Undo the open transaction, if sqlite has not already rolled it back itself (it does on a
        full disk, and a second ROLLBACK would then raise an error that hides the real one)."""
        if self._connection.in_transaction:
            try:
                self._connection.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass

    def close(self) -> None:
        self._connection.close()

    # ------------------------------------------------------------------ reading

    def _rows(self, keys: Sequence[str]) -> dict[str, tuple[str | None, str | None, float | None]]:
        found: dict[str, tuple[str | None, str | None, float | None]] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = list(keys[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, value, owner, claimed_at FROM calls WHERE key IN ({marks})"
            for key, value, owner, claimed_at in self._connection.execute(query, chunk):
                found[key] = (value, owner, claimed_at)
        return found

    def stored(self, keys: Sequence[str]) -> dict[str, Any]:
        return {k: json.loads(v) for k, (v, _, _) in self._rows(keys).items() if v is not None}

    # ------------------------------------------------------------------ claiming

    def _claim(self, keys: Sequence[str], kind: str) -> set[str]:
        """Atomically claim unclaimed keys and take over claims whose owner is gone."""
        now = time.time()
        mine: set[str] = set()
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            self._connection.executemany(
                "INSERT OR IGNORE INTO calls(key, kind, owner, claimed_at) VALUES (?, ?, ?, ?)",
                [(k, kind, self.owner, now) for k in keys],
            )
            for key, (value, owner, claimed_at) in self._rows(keys).items():
                if value is not None:
                    continue
                if owner == self.owner:
                    mine.add(key)
                elif _abandoned(owner, claimed_at, now):
                    self._connection.execute(
                        "UPDATE calls SET owner = ?, claimed_at = ? WHERE key = ? AND value IS NULL",
                        (self.owner, now, key),
                    )
                    mine.add(key)
            self._connection.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return mine

    def _store(self, values: dict[str, Any]) -> None:
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            self._connection.executemany(
                "UPDATE calls SET value = ?, owner = NULL, computations = computations + 1 WHERE key = ?",
                [(json.dumps(v, ensure_ascii=False), k) for k, v in values.items()],
            )
            self._connection.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _release(self, keys: Sequence[str]) -> None:
        """Give up claims without an answer (a failure): the rows vanish, nothing is cached. Best
        effort: where even that cannot be written (a full disk), the claims stay until this process
        ends, and then any run takes them over as abandoned."""
        try:
            self._connection.executemany(
                "DELETE FROM calls WHERE key = ? AND value IS NULL AND owner = ?", [(k, self.owner) for k in keys]
            )
        except sqlite3.DatabaseError:
            pass

    # ------------------------------------------------------------------ the one entry point

    def get_or_compute(
        self,
        keys: Sequence[str],
        kind: str,
        compute: Callable[[list[int]], list[Any | None]],
        stats: CacheStats | None = None,
    ) -> list[Any | None]:
        """Values for every key; `compute(indices)` answers the missing ones (None = failed, not stored)."""
        with self._fault("read or write calls"):
            return self._get_or_compute(keys, kind, compute, stats or CacheStats())

    def _get_or_compute(
        self, keys: Sequence[str], kind: str, compute: Callable[[list[int]], list[Any | None]], stats: CacheStats
    ) -> list[Any | None]:
        results: list[Any | None] = [None] * len(keys)
        positions: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            positions.setdefault(key, []).append(index)
        unique = list(positions)
        known = self.stored(unique)
        stats.hits += sum(len(positions[k]) for k in known)
        remaining = [k for k in unique if k not in known]
        answered = dict(known)
        while remaining:
            computed_any = False
            for start in range(0, len(remaining), self.batch_size):
                chunk = [k for k in remaining[start : start + self.batch_size] if k not in answered]
                mine = self._claim(chunk, kind) if chunk else set()
                if mine:
                    ordered = [k for k in chunk if k in mine]
                    answered.update(self._compute_claimed(ordered, positions, compute, stats))
                    computed_any = True
            arrived = self.stored([k for k in remaining if k not in answered])
            stats.waited += len(arrived)
            answered.update(arrived)
            remaining = [k for k in remaining if k not in answered]
            if remaining and not computed_any:  # the rest is being computed by another live run
                time.sleep(self.poll_seconds)
        for key, indices in positions.items():
            for index in indices:
                results[index] = answered.get(key)
        return results

    def _compute_claimed(
        self,
        ordered: list[str],
        positions: dict[str, list[int]],
        compute: Callable[[list[int]], list[Any | None]],
        stats: CacheStats,
    ) -> dict[str, Any | None]:
        try:
            values = compute([positions[k][0] for k in ordered])
        except BaseException:
            self._release(ordered)
            raise
        good = {k: v for k, v in zip(ordered, values) if v is not None}
        try:
            self._store(good)
        except BaseException:
            self._release(ordered)  # claimed but never filled: give them back
            raise
        self._release([k for k in ordered if k not in good])
        stats.misses += len(ordered)
        return dict(zip(ordered, values))

    def computations(self) -> dict[str, int]:
        return dict(self._connection.execute("SELECT key, computations FROM calls WHERE value IS NOT NULL"))


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_location(path: Path) -> None:
    """Before sqlite touches it: a file (not a folder), an sqlite database if not empty, writable."""
    if path.is_dir():
        raise CacheError(f"call cache {path} is a folder; --cache takes a file path (e.g. {path / 'calls.sqlite'})")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as handle:
            if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise CacheError(f"call cache {path} is not an sqlite database; delete it or choose another file with --cache")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise CacheError(f"call cache {path} is read-only; choose another file with --cache or --no-cache")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir():
        raise CacheError(f"call cache {path} lies under {folder}, which is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheError(f"call cache {path} cannot be written: {folder} is read-only; use --cache elsewhere or --no-cache")


def _abandoned(owner: str | None, claimed_at: float | None, now: float) -> bool:
    """A claim is abandoned when its process is gone (same host) or it is very old."""
    if owner is None or claimed_at is None:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host == socket.gethostname() and pid_text.isdigit():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return now - claimed_at > STALE_CLAIM_SECONDS
