"""Shared fixtures: the shipped catalog and one loaded sentence embedder per test session."""

from __future__ import annotations

import pytest

from apm_bench.catalog import Catalog, load_catalog
from apm_bench.embed import HistoryEmbedder


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="session")
def embedder() -> HistoryEmbedder:
    return HistoryEmbedder()
