"""Shared fixtures: the shipped catalog's default pool and one loaded sentence embedder per test session."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.world.catalog import Catalog, load_catalog


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The default pool: what a default run uses (the shipped folders hold more, for smaller pools)."""
    return load_catalog().default_pool()


@pytest.fixture(scope="session")
def embedder() -> HistoryEmbedder:
    return HistoryEmbedder()


# tests/vllm_engines/ drives real vLLM engines: it runs in its own environment (`make test-vllm`, with
# vLLM's CPU build), which the main one cannot hold beside its own torch stack.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm_engines"]


def pytest_configure(config: pytest.Config) -> None:
    """In-process runs cache into a fresh folder per test session, never into the checkout."""
    os.environ["APM_CACHE"] = str(Path(tempfile.mkdtemp(prefix="apm-test-cache-")) / "calls.sqlite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are collected everywhere and skipped, with the reason, where there is no GPU."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the gpu suite: `make test-gpu`); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
