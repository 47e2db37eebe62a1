"""Shared fixtures: the shipped catalog and one loaded sentence embedder per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from apm_bench.catalog import Catalog, load_catalog
from apm_bench.embed import HistoryEmbedder


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def embedder() -> HistoryEmbedder:
    return HistoryEmbedder()


def pytest_configure(config: pytest.Config) -> None:
    """In-process runs cache into a fresh folder per test session, never into the checkout."""
    os.environ["APM_CACHE"] = str(Path(tempfile.mkdtemp(prefix="apm-test-cache-")) / "calls.sqlite")
