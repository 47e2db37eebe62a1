"""Shared fixtures: the shipped catalog's default pool and one loaded sentence embedder per test session.

`make test` runs the suite on parallel workers (pytest-xdist, whole files to a worker, so module
fixtures are computed once); plain `pytest` runs it in one process. Either way one test run has one
call cache, made fresh for it: the workers share it (it is built for concurrent runs, so what one
worker computed, another reads instead of computing again).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from apm_bench.cache import CallCache
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.world.catalog import Catalog, load_catalog

CALLS = "calls.sqlite"
#: the session embedder's vectors, in a file no run opens: a second connection to a database this
#: process already has open would drop the first one's locks (sqlite's POSIX-lock caveat)
EMBEDDINGS = "embeddings.sqlite"
CACHE_FOLDER = pytest.StashKey[Path]()
#: the files whose whole runs and `apm` processes take most of a parallel run, heaviest first: workers
#: start them before the rest (`make test` keeps this order), so none is left running alone at the end
HEAVY_FIRST = ("test_cache.py", "test_trained_methods.py", "test_popi.py", "test_http_run.py", "test_benchmark.py",
               "test_context_methods.py", "test_cli.py", "test_leaderboard.py", "test_warm_rerun.py")


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The default pool: what a default run uses (the shipped folders hold more, for smaller pools)."""
    return load_catalog().default_pool()


@pytest.fixture(scope="session")
def embedder() -> HistoryEmbedder:
    """Its vectors are cached for the test run, so parallel workers embed each text once between them."""
    return HistoryEmbedder(cache=CallCache(Path(os.environ["APM_CACHE"]).parent / EMBEDDINGS))


# tests/vllm_engines/ drives real vLLM engines: it runs in its own environment (`make test-vllm`, with
# vLLM's CPU build), which the main one cannot hold beside its own torch stack.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm_engines"]


def pytest_configure(config: pytest.Config) -> None:
    """In-process runs cache into a fresh folder per test run, never into the checkout. A plain run
    or the controller of a parallel one makes it (and its databases, before any worker starts, so
    no two workers create one at once). A worker's torch, and the `apm` processes it starts, get its
    share of the cores (OMP_NUM_THREADS, unless set)."""
    worker = getattr(config, "workerinput", None)  # set by pytest-xdist on its workers
    if worker is None:
        folder = Path(tempfile.mkdtemp(prefix="apm-test-cache-"))
        for name in (CALLS, EMBEDDINGS):
            CallCache(folder / name).close()
        config.stash[CACHE_FOLDER] = folder
    else:
        folder = Path(worker["apm_test_cache"])
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(worker["workercount"]))))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    os.environ["APM_CACHE"] = str(folder / CALLS)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # type: ignore[no-untyped-def]
    """pytest-xdist, on the controller: each worker is handed the run's cache folder."""
    node.workerinput["apm_test_cache"] = str(node.config.stash[CACHE_FOLDER])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are collected everywhere and skipped, with the reason, where there is no GPU. On a
    pytest-xdist worker the heavy files come first (each file keeps its own order)."""
    if hasattr(config, "workerinput"):
        rank = {name: index for index, name in enumerate(HEAVY_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
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
