"""The hidden world matrix C that maps user attributes to response principles.

C carries no meaning: it is redrawn for every world seed, so a method can only score by
inferring a user's preference from their history, never by a stereotype such as
"enthusiastic users like persuasive answers".
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from apm_bench.errors import ConfigError

MappingKind = Literal["permutation", "dense"]


def signed_permutation(size: int, rng: np.random.Generator) -> np.ndarray:
    """One ±1 per row and per column, at a random permutation, with independent random signs."""
    matrix = np.zeros((size, size))
    columns = rng.permutation(size)
    signs = rng.choice([-1.0, 1.0], size=size)
    matrix[np.arange(size), columns] = signs
    return matrix


def overlaid_permutations(size: int, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """n_perm signed permutations on disjoint cells, each with its own random signs.

    Disjointness is guaranteed by drawing one random permutation σ and using the cyclic shifts
    σ∘shift(j) for j in a random set of n_perm distinct offsets: two different shifts never
    share a (row, column) cell.
    """
    if not 1 <= n_perm <= size:
        raise ConfigError(f"n_perm must be between 1 and the pool size {size}, got {n_perm}")
    base = rng.permutation(size)
    offsets = rng.choice(size, size=n_perm, replace=False)
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    for offset in offsets:
        columns = base[(rows + offset) % size]
        matrix[rows, columns] = rng.choice([-1.0, 1.0], size=size)
    return matrix


def draw_world_matrix(
    n_principles: int, n_attributes: int, kind: MappingKind, n_perm: int, rng: np.random.Generator
) -> np.ndarray:
    """C ∈ R^{P×A}; `permutation` needs P = A (the paper's default pool has 10 of each)."""
    if kind == "permutation":
        if n_principles != n_attributes:
            raise ConfigError(
                f"a permutation mapping needs as many principles as attributes, got {n_principles} and {n_attributes}"
            )
        return overlaid_permutations(n_principles, n_perm, rng)
    if kind == "dense":
        return rng.standard_normal((n_principles, n_attributes))
    raise ConfigError(f"unknown mapping kind {kind!r}; use 'permutation' or 'dense'")
