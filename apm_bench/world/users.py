"""Users: who they are (attribute vectors), what they want (targets) and which split they belong to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from apm_bench.errors import ConfigError
from apm_bench.world.catalog import Side

NONZERO = 1e-9


class AttributeSetting(BaseModel):
    """One active attribute of a user: which one, and whether they are "very" or "not at all" it."""

    model_config = ConfigDict(frozen=True)

    attribute: str
    side: Side


class Target(BaseModel):
    """One principle the user wants followed or avoided, with its share of the reward."""

    model_config = ConfigDict(frozen=True)

    principle: str
    side: Side
    weight: float


def draw_attribute_settings(
    attribute_ids: list[str], n_attr: int, rng: np.random.Generator
) -> list[AttributeSetting]:
    """n_attr distinct attributes, each on a fair random side."""
    if not 1 <= n_attr <= len(attribute_ids):
        raise ConfigError(f"n_attr must be between 1 and {len(attribute_ids)}, got {n_attr}")
    chosen = rng.choice(len(attribute_ids), size=n_attr, replace=False)
    return [
        AttributeSetting(attribute=attribute_ids[i], side="follow" if rng.random() < 0.5 else "avoid")
        for i in sorted(chosen)
    ]


def attribute_vector(settings: list[AttributeSetting], attribute_ids: list[str]) -> np.ndarray:
    """a_u ∈ {−1, 0, +1}^A."""
    vector = np.zeros(len(attribute_ids))
    for setting in settings:
        vector[attribute_ids.index(setting.attribute)] = 1.0 if setting.side == "follow" else -1.0
    return vector


def targets_from_response_vector(
    response: np.ndarray, principle_ids: list[str], max_targets: int | None = None
) -> list[Target]:
    """The nonzero entries of r_u = C a_u (or the max_targets largest by |r|), weights summing to 1."""
    order = np.argsort(-np.abs(response), kind="stable")
    nonzero = [i for i in order if abs(response[i]) > NONZERO]
    if max_targets is not None:
        nonzero = nonzero[:max_targets]
    total = float(sum(abs(response[i]) for i in nonzero))
    return [
        Target(
            principle=principle_ids[i],
            side="follow" if response[i] > 0 else "avoid",
            weight=float(abs(response[i]) / total),
        )
        for i in nonzero
    ]


@dataclass(frozen=True)
class Split:
    train: list[str]
    validation: list[str]
    test: list[str]

    def role(self, user_id: str) -> str:
        for name in ("train", "validation", "test"):
            if user_id in getattr(self, name):
                return name
        raise KeyError(user_id)


def split_users(
    user_ids: list[str], validation_fraction: float, test_fraction: float, rng: np.random.Generator
) -> Split:
    """Random disjoint train / validation / test sets; every set gets at least one user."""
    n = len(user_ids)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * validation_fraction)) if validation_fraction > 0 else 0
    if n_test + n_val >= n:
        raise ConfigError(f"{n} users are too few for the requested validation and test fractions")
    order = [user_ids[i] for i in rng.permutation(n)]
    return Split(
        test=sorted(order[:n_test]),
        validation=sorted(order[n_test : n_test + n_val]),
        train=sorted(order[n_test + n_val :]),
    )
