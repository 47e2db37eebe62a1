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


#: draws allowed for one permutation that shares no cell with those already accepted
MAX_REJECTIONS = 100_000


def overlaid_permutations(size: int, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """n_perm signed permutations on disjoint cells, each with its own random signs.

    As the APM authors draw them: permutations are drawn at random and one is kept only when it
    shares no (row, column) cell with those kept before (rejection sampling), so every family of
    disjoint permutations can come up, not only the cyclic shifts of one. Signs are drawn after
    all permutations are kept. One permutation is a plain signed permutation (the draw of
    earlier versions, so n_perm = 1 worlds are unchanged).
    """
    if not 1 <= n_perm <= size:
        raise ConfigError(f"n_perm must be between 1 and the pool size {size}, got {n_perm}")
    rows = np.arange(size)
    if n_perm == 1:
        base = rng.permutation(size)
        columns = base[(rows + rng.choice(size)) % size]
        matrix = np.zeros((size, size))
        matrix[rows, columns] = rng.choice([-1.0, 1.0], size=size)
        return matrix
    kept: list[np.ndarray] = []
    while len(kept) < n_perm:
        for _ in range(MAX_REJECTIONS):
            candidate = rng.permutation(size)
            if all((candidate != other).all() for other in kept):
                kept.append(candidate)
                break
        else:
            raise ConfigError(f"no {n_perm} disjoint permutations of {size} found by rejection sampling "
                              f"within {MAX_REJECTIONS} draws; use a smaller n_perm")
    matrix = np.zeros((size, size))
    for columns in kept:
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
