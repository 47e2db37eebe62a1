"""What a run is made of before any phase: the method rows (references first), the catalog's pool,
the population and its prompts, one world per seed, and the histories methods are shown.

Shared by `apm run`, `apm curve`, `apm suite` and `apm robustness`, so every command builds the same
worlds from the same config.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apm_bench.errors import ConfigError
from apm_bench.methods import METHODS
from apm_bench.methods.artifacts import ArtifactStore
from apm_bench.run.config import RunConfig
from apm_bench.run.engines import check_roles
from apm_bench.sim.writer import SimHistoryWriter
from apm_bench.world.catalog import Catalog, load_catalog
from apm_bench.world.histories import (
    HistoryWriter,
    Population,
    build_population,
    import_reference_conversations,
    keep_history,
)
from apm_bench.world.prompts import NeutralPrompt, load_prompts, split_prompt_pools
from apm_bench.world.world import World, build_world

BASELINE = "baseline"


ORACLE = "oracle"


PRIOR = "prior"


#: reference rows in every run: what everything is compared with, the upper bound, and what a
#: method earns without reading any history
REFERENCES = (BASELINE, ORACLE, PRIOR)


@dataclass(frozen=True)
class MethodVariant:
    """One row of the results: a registered method with fixed options, under a display name."""

    label: str
    method: str
    options: dict[str, Any]


def artifact_store(config: RunConfig) -> ArtifactStore:
    """Beside the call cache, so a resumed run finds what it trained; a private folder without one."""
    if config.cache is not None:
        return ArtifactStore(Path(config.cache).parent / "artifacts")
    return ArtifactStore(Path(tempfile.mkdtemp(prefix="apm-artifacts-")))


def plan_methods(config: RunConfig, references: tuple[str, ...] | None = None) -> list[MethodVariant]:
    """The reference rows first (baseline, oracle for gain, prior, and the bound gain is measured
    against where that is another method), then the asked methods. A study that needs other
    references (the robustness check compares with the baseline alone) names its own."""
    if references is None:
        references = REFERENCES + ((config.gain_against,) if config.gain_against not in REFERENCES else ())
    names = list(references) + [m for m in config.methods if m not in references]
    variants: list[MethodVariant] = []
    for name in names:
        cls = METHODS.get(name)
        options = dict(config.method_options.get(name, {}))
        strategies = config.label_strategy if "label_strategy" in cls.Options.model_fields else []
        if strategies and "label_strategy" not in options and len(strategies) > 1:
            variants += [MethodVariant(f"{name}[{s}]", name, {**options, "label_strategy": s}) for s in strategies]
        else:
            if strategies and "label_strategy" not in options:
                options["label_strategy"] = strategies[0]
            variants.append(MethodVariant(name, name, options))
    for variant in variants:  # fail on a bad option now, before any work or output
        METHODS.get(variant.method)(**variant.options)
    return variants


def load_pool_catalog(config: RunConfig) -> Catalog:
    catalog = load_catalog(config.principles_dir, config.personas_dir)
    if config.pool > catalog.largest_pool:
        raise ConfigError(f"pool {config.pool} is larger than the catalog's largest pool ({catalog.largest_pool})")
    if config.n_attr > config.pool:
        raise ConfigError(f"n_attr {config.n_attr} exceeds the pool size {config.pool}")
    return catalog.with_pool(config.pool)


def load_population(config: RunConfig, catalog: Catalog, writer: HistoryWriter | None = None) -> Population:
    if config.conversations_file is not None:
        return import_reference_conversations(config.conversations_file, catalog, config.history_len,
                                              config.test_conversations_file)
    prompts, test_prompts = prompt_pools(config)
    population = build_population(
        catalog, prompts, writer or SimHistoryWriter(catalog, config.writer), config.users, config.n_attr,
        drawn_history_len(config), config.data_seed, balanced=config.balanced_population, test_prompts=test_prompts,
        test_users=round(config.users * config.test_fraction) if test_prompts is not None else 0,
    )
    return population if config.drawn_history_len is None else keep_history(population, config.history_len)


def drawn_history_len(config: RunConfig) -> int:
    return config.history_len if config.drawn_history_len is None else config.drawn_history_len


def prompt_pools(config: RunConfig) -> tuple[list[NeutralPrompt], list[NeutralPrompt] | None]:
    """The prompts of training-side users, and of test users where those must be disjoint (a test
    prompt file of their own, or a share of the one set)."""
    prompts = load_prompts(config.prompts_file)
    if config.test_prompts_file is not None:
        return prompts, load_prompts(config.test_prompts_file)
    if config.disjoint_test_prompts:
        return split_prompt_pools(prompts, config.test_fraction, drawn_history_len(config) + 1, config.data_seed)
    return prompts, None


def prepare(config: RunConfig, writer: HistoryWriter | None = None) -> tuple[Catalog, Population]:
    """Load and validate every input; raises ApmError before anything is computed or written."""
    check_roles(config)
    catalog = load_pool_catalog(config)
    population = load_population(config, catalog, writer)
    build_worlds(config, catalog, population)  # e.g. more train_users than a world has
    return catalog, population


def build_worlds(config: RunConfig, catalog: Catalog, population: Population) -> list[World]:
    """One world (a draw of C, its targets and split) per world seed of the config."""
    return [
        build_world(
            population, catalog, world_seed, config.mapping, config.n_perm, config.max_targets,
            config.validation_fraction, config.test_fraction,
            split_seed=world_seed if config.split_per_world else config.data_seed, train_users=config.train_users,
        )
        for world_seed in config.worlds
    ]


def apply_control(world: World, config: RunConfig) -> dict[str, tuple[str, ...]]:
    """The histories methods are shown: real, empty (no-history) or permuted across users."""
    ids = sorted(world.users)
    histories = {uid: tuple(world.users[uid].history) for uid in ids}
    if config.control == "no-history":
        return {uid: () for uid in ids}
    if config.control == "shuffled-history":
        order = np.random.default_rng([world.seed, 0x5F]).permutation(len(ids))
        return {uid: histories[ids[j]] for uid, j in zip(ids, order)}
    return histories
