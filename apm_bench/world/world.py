"""A world: one population of users seen through one hidden mapping C, with its user split.

C is drawn from the world seed; the population (attributes and histories) comes
from the data seed and is shared by all worlds of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apm_bench.errors import ConfigError
from apm_bench.world.catalog import Catalog
from apm_bench.world.histories import Population, PopulationUser
from apm_bench.world.mapping import MappingKind, draw_world_matrix
from apm_bench.world.users import (
    Split,
    Target,
    attribute_vector,
    nested_order,
    split_users,
    stratum,
    targets_from_response_vector,
)


@dataclass(frozen=True)
class World:
    seed: int
    matrix: np.ndarray
    users: dict[str, PopulationUser]
    targets: dict[str, list[Target]]
    split: Split
    users_without_targets: int


def build_world(
    population: Population,
    catalog: Catalog,
    seed: int,
    mapping: MappingKind = "permutation",
    n_perm: int = 1,
    max_targets: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    train_users: int | None = None,
) -> World:
    """The split comes from `split_seed`: the data seed (one split for every world) or the world
    seed (each world a fresh split). It is stratified by the users' (attribute, side) cells, so
    training and test sets hold the same mix of users whichever seed draws it: a random split of
    one fixed population would make them anti-correlated (they partition it), and a method that
    predicts the training majority would lose systematically instead of scoring zero.

    `train_users` caps the training set (validation and test stay as they are) at a nested,
    stratified subset: see `cap_training`."""
    rng = np.random.default_rng([seed, 0xC])
    matrix = draw_world_matrix(len(catalog.principles), len(catalog.attributes), mapping, n_perm, rng)
    targets: dict[str, list[Target]] = {}
    for user in population.users:
        response = matrix @ attribute_vector(user.attributes, catalog.attribute_ids)
        targets[user.id] = targets_from_response_vector(response, catalog.principle_ids, max_targets)
    scorable = [u.id for u in population.users if targets[u.id]]
    everyone = _split(population, validation_fraction, test_fraction, np.random.default_rng([split_seed, 0x5]))
    keep = set(scorable)
    split = Split(
        train=[u for u in everyone.train if u in keep],
        validation=[u for u in everyone.validation if u in keep],
        test=[u for u in everyone.test if u in keep],
    )
    if train_users is not None:
        split = cap_training(split, population, train_users, seed, np.random.default_rng([split_seed, 0x7C]))
    return World(
        seed=seed,
        matrix=matrix,
        users={u.id: u for u in population.users},
        targets={uid: targets[uid] for uid in scorable},
        split=split,
        users_without_targets=len(population.users) - len(scorable),
    )


def _split(population: Population, validation_fraction: float, test_fraction: float, rng: np.random.Generator) -> Split:
    """A stratified split of the whole population; where the data holds its own test users (the
    authors' test file), those, and `validation_fraction` of the others for validation."""
    if population.test_ids is None:
        return split_users([u.id for u in population.users], validation_fraction, test_fraction, rng,
                           strata=[stratum(u.attributes) for u in population.users])
    held_out = set(population.test_ids)
    others = [u for u in population.users if u.id not in held_out]
    if validation_fraction <= 0:
        return Split(train=sorted(u.id for u in others), validation=[], test=sorted(held_out))
    drawn = split_users([u.id for u in others], 0.0, validation_fraction, rng, strata=[stratum(u.attributes) for u in others])
    return Split(train=drawn.train, validation=drawn.test, test=sorted(held_out))


def cap_training(split: Split, population: Population, limit: int, world_seed: int, rng: np.random.Generator) -> Split:
    """The first `limit` training users in `nested_order`: the same split seed gives the same order,
    so the users a smaller cap keeps are among those a larger one keeps."""
    if limit > len(split.train):
        raise ConfigError(f"train_users {limit} exceeds the {len(split.train)} training users of world {world_seed} "
                          f"(the population less its validation and test users)")
    attributes = {u.id: u.attributes for u in population.users}
    order = nested_order(split.train, [stratum(attributes[uid]) for uid in split.train], rng)
    return Split(train=sorted(order[:limit]), validation=split.validation, test=split.test)
