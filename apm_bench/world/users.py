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


def draw_balanced_attribute_settings(
    attribute_ids: list[str], n_attr: int, n_users: int, rng: np.random.Generator
) -> list[list[AttributeSetting]]:
    """Attribute settings for a whole population, balanced by construction.

    Independent fair draws leave a finite population with more users on one side of some attribute
    (400 users: often 20+ more). The split keeps that imbalance in training and test, and since C
    maps the attribute to some principle side in every world, "always instruct the majority label"
    then scores in every world without reading a history. Here every user takes the n_attr least
    used attributes (ties broken at random, preferring attribute pairs used least), so attribute
    counts differ by at most one; each attribute's side is the one it has fewer users on (a coin
    flip on a tie), so its follow and avoid counts differ by at most one as well.
    """
    if not 1 <= n_attr <= len(attribute_ids):
        raise ConfigError(f"n_attr must be between 1 and {len(attribute_ids)}, got {n_attr}")
    n = len(attribute_ids)
    used = np.zeros(n, dtype=int)
    lean = np.zeros(n, dtype=int)  # follow minus avoid users
    together = np.zeros((n, n), dtype=int)
    population = []
    for _ in range(n_users):
        chosen: list[int] = []
        while len(chosen) < n_attr:
            open_ = [i for i in range(n) if i not in chosen]
            fewest = min(used[i] for i in open_)
            pool = [i for i in open_ if used[i] == fewest]
            pair_use = np.array([sum(together[i, j] for j in chosen) for i in pool])
            pool = [i for i, c in zip(pool, pair_use) if c == pair_use.min()]
            chosen.append(int(pool[int(rng.integers(len(pool)))]))
        for i in chosen:
            used[i] += 1
            for j in chosen:
                together[i, j] += i != j
        settings = []
        for i in sorted(chosen):
            follow = lean[i] < 0 or (lean[i] == 0 and rng.random() < 0.5)
            lean[i] += 1 if follow else -1
            settings.append(AttributeSetting(attribute=attribute_ids[i], side="follow" if follow else "avoid"))
        population.append(settings)
    return population


def stratum(settings: list[AttributeSetting]) -> str:
    """The (attribute, side) cells of a user, as one key for stratified splitting."""
    return "|".join(sorted(f"{s.attribute}:{s.side}" for s in settings))


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
    user_ids: list[str],
    validation_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
    strata: list[str] | None = None,
) -> Split:
    """Disjoint train / validation / test sets; every set gets at least one user.

    With `strata` (one key per user, e.g. `stratum(attributes)`) the split is stratified: users are
    laid out stratum by stratum (strata and members in random order) and every k-th position goes
    to test, then to validation, so each stratum is divided in the same proportions to within one
    user. Without them it is a plain random split.
    """
    n = len(user_ids)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * validation_fraction)) if validation_fraction > 0 else 0
    if n_test + n_val >= n:
        raise ConfigError(f"{n} users are too few for the requested validation and test fractions")
    if strata is None:
        order = [user_ids[i] for i in rng.permutation(n)]
        return Split(
            test=sorted(order[:n_test]),
            validation=sorted(order[n_test : n_test + n_val]),
            train=sorted(order[n_test + n_val :]),
        )
    keys = sorted(set(strata))
    rank = {key: position for position, key in enumerate(rng.permutation(len(keys)))}
    shuffle = rng.permutation(n)
    layout = sorted(range(n), key=lambda i: (rank[keys.index(strata[i])], shuffle[i]))
    test_positions = _evenly_spaced(n, n_test, float(rng.random()))
    rest = [p for p in range(n) if p not in test_positions]
    validation_positions = {rest[p] for p in _evenly_spaced(len(rest), n_val, float(rng.random()))}
    role = np.zeros(n, dtype=int)  # 0 train, 1 validation, 2 test
    role[[layout[p] for p in test_positions]] = 2
    role[[layout[p] for p in validation_positions]] = 1
    role = _balance_cells(role, strata, rng)
    return Split(
        test=sorted(user_ids[i] for i in np.flatnonzero(role == 2)),
        validation=sorted(user_ids[i] for i in np.flatnonzero(role == 1)),
        train=sorted(user_ids[i] for i in np.flatnonzero(role == 0)),
    )


def nested_order(user_ids: list[str], strata: list[str], rng: np.random.Generator) -> list[str]:
    """The users in an order whose every prefix holds each stratum in proportion, to within one user.

    Capping the training users at n keeps the first n: as balanced as the whole set (a plain random
    subset of 50 can lean to one side of an attribute, which the prior would then score on), and
    nested, so a larger cap keeps every user a smaller one kept and a learning curve over n measures
    the amount of data rather than which users were drawn. Each stratum's members take evenly spaced
    ranks from a random phase; the order depends only on the ids, strata and rng.
    """
    groups: dict[str, list[str]] = {}
    for uid, key in zip(user_ids, strata):
        groups.setdefault(key, []).append(uid)
    keys = sorted(groups)
    phases = rng.random(len(keys))
    ranked: list[tuple[float, str]] = []
    for key, phase in zip(keys, phases):
        members = [groups[key][i] for i in rng.permutation(len(groups[key]))]
        ranked += [((i + phase) / len(members), uid) for i, uid in enumerate(members)]
    return [uid for _, uid in sorted(ranked)]


def _balance_cells(role: np.ndarray, strata: list[str], rng: np.random.Generator, rounds: int = 20) -> np.ndarray:
    """Swap users between sets while that brings each set's (attribute, side) cells closer to its share.

    A user with two attributes belongs to two cells, so laying out strata cannot balance every
    cell at once; swaps that lower the total deviation from proportional counts can. Set sizes
    never change. With one attribute per user the layout is already balanced and nothing moves.
    """
    cells = sorted({cell for key in strata for cell in key.split("|")})
    membership = np.zeros((len(strata), len(cells)))
    for i, key in enumerate(strata):
        for cell in key.split("|"):
            membership[i, cells.index(cell)] = 1.0
    total = membership.sum(axis=0)
    shares = np.array([(role == r).mean() for r in range(3)])
    counts = np.stack([membership[role == r].sum(axis=0) for r in range(3)])

    def deviation(c: np.ndarray) -> float:
        return float(np.abs(c - shares[:, None] * total).sum())

    current = deviation(counts)
    for _ in range(rounds):
        improved = False
        over = counts - shares[:, None] * total > 0.5  # cells with a surplus in a set: only their users may move
        movable = np.flatnonzero((membership * over[role]).any(axis=1))
        for i in rng.permutation(movable):
            for j in rng.permutation(len(role))[:40]:
                a, b = role[i], role[j]
                if a == b or strata[i] == strata[j]:
                    continue
                moved = counts.copy()
                moved[a] += membership[j] - membership[i]
                moved[b] += membership[i] - membership[j]
                value = deviation(moved)
                if value < current - 1e-9:
                    role[i], role[j], counts, current, improved = b, a, moved, value, True
                    break
        if not improved:
            break
    return role


def _evenly_spaced(n: int, k: int, phase: float) -> set[int]:
    """k of the positions 0..n-1, one in every n/k, starting at a random phase."""
    if k == 0:
        return set()
    step = n / k
    return {min(n - 1, int((j + phase) * step)) for j in range(k)}
