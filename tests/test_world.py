"""The hidden mapping C, users' targets and the split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apm_bench.errors import ConfigError
from apm_bench.sim.writer import SimHistoryWriter, SimWriterConfig
from apm_bench.world.catalog import Catalog
from apm_bench.world.histories import build_population
from apm_bench.world.mapping import draw_world_matrix, overlaid_permutations, signed_permutation
from apm_bench.world.prompts import load_prompts
from apm_bench.world.users import (
    AttributeSetting,
    Target,
    attribute_vector,
    draw_balanced_attribute_settings,
    split_users,
    stratum,
    targets_from_response_vector,
)


@pytest.mark.parametrize("seed", range(20))
def test_signed_permutation_has_one_signed_unit_per_row_and_column(seed: int) -> None:
    matrix = signed_permutation(10, np.random.default_rng(seed))
    assert set(np.unique(matrix)) <= {-1.0, 0.0, 1.0}
    assert (np.abs(matrix).sum(axis=0) == 1).all()
    assert (np.abs(matrix).sum(axis=1) == 1).all()


@pytest.mark.parametrize("n_perm", [1, 2, 3, 5])
def test_overlaid_permutations_are_disjoint(n_perm: int) -> None:
    for seed in range(10):
        matrix = overlaid_permutations(10, n_perm, np.random.default_rng(seed))
        assert set(np.unique(matrix)) <= {-1.0, 0.0, 1.0}
        # Disjoint overlays: every row and column holds exactly n_perm nonzero cells.
        assert (np.count_nonzero(matrix, axis=0) == n_perm).all()
        assert (np.count_nonzero(matrix, axis=1) == n_perm).all()


def test_signs_are_balanced_across_world_seeds() -> None:
    signs = np.concatenate(
        [draw_world_matrix(10, 10, "permutation", 1, np.random.default_rng([s, 0xC]))[np.nonzero(
            draw_world_matrix(10, 10, "permutation", 1, np.random.default_rng([s, 0xC])))] for s in range(300)]
    )
    assert signs.size == 3000
    assert 0.46 < (signs > 0).mean() < 0.54


def test_permutation_columns_are_uniform_across_seeds() -> None:
    """Every attribute maps to every principle about equally often: C carries no fixed association."""
    counts = np.zeros((10, 10))
    for seed in range(1000):
        counts += np.abs(draw_world_matrix(10, 10, "permutation", 1, np.random.default_rng(seed)))
    assert counts.min() > 60 and counts.max() < 140


def test_same_seed_same_matrix_other_seed_other_matrix() -> None:
    a = draw_world_matrix(10, 10, "permutation", 1, np.random.default_rng(3))
    b = draw_world_matrix(10, 10, "permutation", 1, np.random.default_rng(3))
    c = draw_world_matrix(10, 10, "permutation", 1, np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dense_matrix_is_gaussian_and_full() -> None:
    matrix = draw_world_matrix(10, 10, "dense", 1, np.random.default_rng(0))
    assert np.count_nonzero(matrix) == 100
    assert abs(matrix.mean()) < 0.4 and 0.6 < matrix.std() < 1.4


def test_invalid_mappings_are_refused() -> None:
    with pytest.raises(ConfigError):
        draw_world_matrix(10, 8, "permutation", 1, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        overlaid_permutations(4, 5, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        draw_world_matrix(4, 4, "diagonal", 1, np.random.default_rng(0))  # type: ignore[arg-type]


PRINCIPLES = [f"p{i}" for i in range(10)]
ATTRIBUTES = [f"a{i}" for i in range(10)]


@pytest.mark.parametrize("kind,n_perm,n_attr", [("permutation", 1, 1), ("permutation", 1, 2), ("permutation", 3, 2), ("dense", 1, 2)])
def test_target_weights_sum_to_one_and_follow_the_signs(kind: str, n_perm: int, n_attr: int) -> None:
    rng = np.random.default_rng(7)
    matrix = draw_world_matrix(10, 10, kind, n_perm, rng)  # type: ignore[arg-type]
    for _ in range(50):
        chosen = rng.choice(10, size=n_attr, replace=False)
        settings = [AttributeSetting(attribute=ATTRIBUTES[i], side=rng.choice(["follow", "avoid"])) for i in chosen]
        response = matrix @ attribute_vector(settings, ATTRIBUTES)
        targets = targets_from_response_vector(response, PRINCIPLES)
        if not targets:
            assert np.allclose(response, 0)
            continue
        assert sum(t.weight for t in targets) == pytest.approx(1.0)
        for target in targets:
            value = response[PRINCIPLES.index(target.principle)]
            assert (value > 0) == (target.side == "follow")


def test_permutation_targets_of_one_attribute_user() -> None:
    matrix = np.zeros((3, 3))
    matrix[0, 2], matrix[1, 0], matrix[2, 1] = -1, 1, 1
    response = matrix @ attribute_vector([AttributeSetting(attribute="a2", side="follow")], ["a0", "a1", "a2"])
    assert targets_from_response_vector(response, ["p0", "p1", "p2"]) == [Target(principle="p0", side="avoid", weight=1.0)]


def test_max_targets_keeps_the_largest_entries() -> None:
    response = np.array([0.1, -2.0, 0.0, 1.0])
    targets = targets_from_response_vector(response, ["a", "b", "c", "d"], max_targets=2)
    assert [(t.principle, t.side) for t in targets] == [("b", "avoid"), ("d", "follow")]
    assert [t.weight for t in targets] == pytest.approx([2 / 3, 1 / 3])


def test_split_is_disjoint_and_complete() -> None:
    ids = [f"u{i}" for i in range(100)]
    split = split_users(ids, 0.1, 0.25, np.random.default_rng(0))
    assert len(split.test) == 25 and len(split.validation) == 10 and len(split.train) == 65
    assert set(split.train) | set(split.validation) | set(split.test) == set(ids)
    assert not (set(split.train) & set(split.test)) and not (set(split.validation) & set(split.test))


@settings(max_examples=60, deadline=None)
@given(n_users=st.integers(10, 600), n_attr=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_balanced_population_uses_attributes_and_sides_evenly(n_users: int, n_attr: int, seed: int) -> None:
    ids = [f"a{i}" for i in range(10)]
    population = draw_balanced_attribute_settings(ids, n_attr, n_users, np.random.default_rng(seed))
    assert len(population) == n_users
    assert all(len({s.attribute for s in user}) == n_attr for user in population)
    used = Counter(s.attribute for user in population for s in user)
    lean = Counter()
    for user in population:
        for s in user:
            lean[s.attribute] += 1 if s.side == "follow" else -1
    assert max(used[a] for a in ids) - min(used[a] for a in ids) <= 1
    assert max(abs(v) for v in lean.values()) <= 1


def _cell_counts(user_ids: list[str], settings: dict[str, list[AttributeSetting]]) -> Counter:
    return Counter(f"{s.attribute}:{s.side}" for u in user_ids for s in settings[u])


@pytest.mark.parametrize("n_attr,n_users", [(1, 400), (1, 403), (2, 400), (2, 1600)])
def test_stratified_split_divides_every_cell_in_proportion(n_attr: int, n_users: int) -> None:
    ids = [f"a{i}" for i in range(10)]
    population = draw_balanced_attribute_settings(ids, n_attr, n_users, np.random.default_rng(7))
    users = [f"u{i}" for i in range(n_users)]
    settings = dict(zip(users, population))
    split = split_users(users, 0.1, 0.25, np.random.default_rng(1), strata=[stratum(s) for s in population])
    assert len(split.test) == round(0.25 * n_users) and len(split.validation) == round(0.1 * n_users)
    assert sorted(split.train + split.validation + split.test) == sorted(users)
    total = _cell_counts(users, settings)
    for part in (split.test, split.validation, split.train):
        share = len(part) / n_users
        counts = _cell_counts(part, settings)
        assert max(abs(counts[cell] - share * total[cell]) for cell in total) <= 1.5


def test_an_unstratified_split_keeps_chance_imbalances() -> None:
    """The contrast that makes stratification necessary: a random split of the same users is off by several."""
    ids = [f"a{i}" for i in range(10)]
    population = draw_balanced_attribute_settings(ids, 1, 400, np.random.default_rng(7))
    users = [f"u{i}" for i in range(400)]
    settings = dict(zip(users, population))
    split = split_users(users, 0.1, 0.25, np.random.default_rng(1))
    counts, total = _cell_counts(split.test, settings), _cell_counts(users, settings)
    assert max(abs(counts[cell] - 0.25 * total[cell]) for cell in total) >= 3


def test_iid_attributes_reproduce_the_unbalanced_draw(catalog: Catalog) -> None:
    """--iid-attributes keeps the earlier user-by-user draw, in which data seed 13 has 23 more
    'very unpolished' than 'not at all unpolished' users; its balanced population leans by at most one."""
    prompts = load_prompts()
    writer = SimHistoryWriter(catalog, SimWriterConfig())

    def lean(balanced: bool) -> Counter:
        population = build_population(catalog, prompts, writer, 400, 1, 8, seed=13, balanced=balanced)
        counts: Counter = Counter()
        for user in population.users:
            counts[user.attributes[0].attribute] += 1 if user.attributes[0].side == "follow" else -1
        return counts

    assert lean(False).most_common(1) == [("unpolished", 23)]
    assert max(map(abs, lean(True).values())) <= 1


def test_overlaid_permutations_are_not_only_cyclic_shifts_of_one() -> None:
    """Two disjoint permutations p, q make rows and columns into cycles whose lengths are those of
    p⁻¹q. Shifts of one permutation give p⁻¹q a shift, so every cycle has one length; rejection
    sampling, as the authors draw them, gives any derangement, so lengths differ in some worlds."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    def component_sizes(matrix: np.ndarray) -> list[int]:
        size = len(matrix)
        graph = np.zeros((2 * size, 2 * size))
        graph[:size, size:] = matrix != 0
        _, labels = connected_components(csr_matrix(graph), directed=False)
        return sorted(np.bincount(labels).tolist())

    uneven = sum(len(set(component_sizes(overlaid_permutations(10, 2, np.random.default_rng(seed))))) > 1
                 for seed in range(50))
    assert uneven >= 20  # a random derangement of 10 has cycles of one length only rarely
