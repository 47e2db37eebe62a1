"""The run: world → methods → generation → judging → metrics, for every world seed.

Everything a run needs is built here from the config and passed down explicitly; there are no
module-level engines. The population, candidate bank and embedder are shared across worlds, since
none of them depends on the hidden mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from apm_bench.inputs import check_output_dir
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.judging.label_diagnostics import LabelDiagnostics, label_diagnostics
from apm_bench.judging.metrics import MethodMetrics, compute_metrics
from apm_bench.methods import METHODS
from apm_bench.methods.artifacts import ArtifactStore
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig, check_memory
from apm_bench.run.phases import (
    Planned,
    Progress,
    Stages,
    Stopwatch,
    fit_and_plan,
    fit_context,
    generate_all,
    prefetch_history_vectors,
    rate_all,
    rated_candidates,
    test_users_frame,
    world_frame,
)
from apm_bench.run.setup import (
    MethodVariant,
    artifact_store,
    build_worlds,
    load_pool_catalog,
    load_population,
    plan_methods,
    prompt_pools,
)
from apm_bench.run.engines import Engines, EngineWrapper, build_engines
from apm_bench.world.catalog import Catalog
from apm_bench.world.histories import Population

@dataclass
class RunResult:
    config: RunConfig
    samples: pd.DataFrame
    metrics: list[MethodMetrics]
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    population_source: str = ""
    #: one entry per trained (or reused) adapter: world, method, name, steps, examples, seconds, losses
    training: list[dict[str, Any]] = field(default_factory=list)
    artifacts: ArtifactStore | None = None
    #: routing diagnostics: chosen labels against true top targets, per method and world
    label_diagnostics: list[LabelDiagnostics] = field(default_factory=list)
    #: the principle and attribute ids of the run's pool, in order (pools are catalog data, so record them)
    pool_members: dict[str, list[str]] = field(default_factory=dict)
    #: one row per (world, test user): the history methods saw and the hidden attributes
    users: pd.DataFrame | None = None


def run_benchmark(
    config: RunConfig, progress: Progress | None = None, embedder: HistoryEmbedder | None = None,
    wrap_engine: EngineWrapper | None = None,
) -> RunResult:
    """Run every world; pass an `embedder` to reuse its loaded model and memo across runs, and
    `wrap_engine` to see every engine call (apm-tiny's corpus records the simulator's answers so)."""
    check_memory(config)
    check_output_dir(config.out, "output folder (--out)")  # found now, not after the run is computed
    variants = plan_methods(config)
    say = Stages(progress, total=len(config.worlds) * len(variants) + 6)
    say("population")
    catalog = load_pool_catalog(config)
    if config.conversations_file is None:
        prompt_pools(config)  # a bad prompt file fails before any engine starts
    if config.train_users is not None:  # so does a cap larger than a world's training set
        build_worlds(config, catalog, load_population(config, catalog))
    engines = build_engines(config, catalog, embedder, wrap_engine)
    config = config.model_copy(update={"embedder": engines.embedder.backend})  # recorded: the φ this run used
    engines.report_retries(say.detail)
    try:
        population = load_population(config, catalog, engines.history_writer)
        return _run_all(config, variants, catalog, population, engines, say)
    finally:
        engines.close()


def _run_all(
    config: RunConfig,
    variants: list[MethodVariant],
    catalog: Catalog,
    population: Population,
    engines: Engines,
    say: Stages,
) -> RunResult:
    """The run in phases that each need one role, so every engine gets the largest batches and is
    loaded as few times as possible: candidates (candidate writer), their ratings (judge), the fits
    (the generator or judge only where a method needs them), every test generation of every world
    and method in one batch (generator), then all their ratings (judge)."""
    watch = Stopwatch(engines)
    store = artifact_store(config)
    training: list[dict[str, Any]] = []
    label_training: list[tuple[str, str, float, int]] = []
    worlds = build_worlds(config, catalog, population)
    with_test_users = any(METHODS.get(v.method).needs_test_feedback for v in variants)
    prefetch_history_vectors(variants, worlds, config, engines)
    bank = rated_candidates(config, catalog, engines, worlds, watch, say, with_test_users)
    planned: list[Planned] = []
    for world in worlds:
        context, test_users = fit_context(world, config, catalog, engines, bank, say, store)
        test_feedback = FeedbackOracle(bank, {u.id: world.targets[u.id] for u in test_users}) if with_test_users else None
        for variant in variants:
            say(f"world {world.seed}: {variant.label}")
            planned.append(fit_and_plan(variant, world, context, test_users, config, watch, training, test_feedback, label_training))
    generations = generate_all(planned, engines, watch, say)
    ratings = rate_all(planned, generations, engines, watch, say)
    samples = pd.concat([world_frame(planned, generations, ratings, world.seed) for world in worlds], ignore_index=True)
    say("metrics")
    metrics = compute_metrics(samples, config.bootstrap_seed, config.bootstrap_resamples, oracle_method=config.gain_against)
    watch.costs["candidates"].update(generation_calls=float(bank.generation_calls), rating_calls=float(bank.rating_calls))
    watch.costs["engines"] = engines.budget.snapshot()
    # users the history writer failed on are discarded before any world is built: counted here
    watch.costs["population"] = {"users": float(len(population.users)),
                                 "discarded_users": float(population.discarded_users)}
    watch.costs["embedding"] = {"texts_encoded": float(engines.embedder.encoded_texts), **{
        f"embedding_{k}": float(v) for k, v in engines.embedder.stats.snapshot().items()}}
    say("done")
    diagnostics = label_diagnostics(samples, label_training)
    members = {"principles": catalog.principle_ids, "attributes": catalog.attribute_ids}
    return RunResult(config, samples, metrics, watch.costs, population.source, training, store, diagnostics, members,
                     test_users_frame(planned))
