"""World 0 of the default config and the fit context a method is handed in it, for tests that
fit methods directly (without a whole run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apm_bench.backends.base import Backend
from apm_bench.judging.candidates import CandidateBank
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.methods.artifacts import ArtifactStore
from apm_bench.methods.base import FitContext, FitUser
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.engines import build_engines
from apm_bench.run.setup import load_pool_catalog, load_population
from apm_bench.world.world import build_world


def world_zero(
    embedder: HistoryEmbedder,
    generator: Backend | None = None,
    n_train: int | None = None,
    artifacts: Path | None = None,
) -> tuple[Any, Any, Any, FitContext]:
    """Engines, population, world 0 and its fit context; `generator` replaces the sim generator
    (the candidates stay the simulator's), `n_train` keeps only the first training users."""
    config = RunConfig(worlds=[0])
    catalog = load_pool_catalog(config)
    engines = build_engines(config, catalog, embedder)
    population = load_population(config, catalog, engines.history_writer)
    world = build_world(population, catalog, 0, validation_fraction=0.1, test_fraction=0.25)
    train = world.split.train[:n_train] if n_train is not None else world.split.train
    bank = CandidateBank(engines.candidate_writer, engines.judge, catalog)
    bank.ensure({u: world.users[u].prompt for u in train})
    context = FitContext(
        [FitUser(u, tuple(world.users[u].history), world.users[u].prompt) for u in train], [],
        FeedbackOracle(bank, {u: world.targets[u] for u in train}), generator or engines.generator, embedder,
        list(catalog.principles), 0, artifacts=ArtifactStore(artifacts) if artifacts is not None else None,
    )
    return engines, population, world, context
