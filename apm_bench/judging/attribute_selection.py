"""Attribute selection: the APM paper's factor analysis of judge ratings.

A judge rates many candidate attributes (response principles, or traits of user prompts) on many
responses. Attributes that mostly measure the same thing correlate; a pool built from them would
give users preferences that cannot be told apart. The analysis keeps the attributes whose ratings
vary (an entropy filter on the discrete rating distribution), finds how many independent
dimensions the ratings hold (parallel analysis: components whose eigenvalue beats the 95th
percentile of eigenvalues of random data of the same shape; their count is k95), and for every k
from 2 to k95 rotates the first k principal components (varimax) so that each one is carried by a
few attributes. The attribute loading most strongly on a rotated component represents it; the k
representatives are the pool of size k.

Pure numpy: the analysis is small (a correlation matrix of the candidates), and the rotation is a
few lines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from apm_bench.errors import ApmError

TOP_LOADINGS = 5


class SelectionError(ApmError):
    """The ratings leave too little to analyse (too few responses or varying attributes)."""


class FactorChoice(BaseModel):
    """One rotated component of a pool and the attribute that represents it."""

    factor: int = Field(description="rank of the component by the variance it carries, 1 = most")
    attribute: str
    loading: float = Field(description="the representative's loading on the component (signed so the strongest is positive)")
    variance: float = Field(description="sum of squared loadings of the rotated component")
    top: dict[str, float] = Field(description="the strongest loadings on the component, strongest first")


class PoolSelection(BaseModel):
    k: int
    factors: list[FactorChoice]

    @property
    def attributes(self) -> list[str]:
        return [f.attribute for f in self.factors]


class AttributeSelection(BaseModel):
    """What `apm select-attributes` found; saved as selection.json beside the pool files."""

    n_responses: int
    n_candidates: int
    min_entropy: float
    seed: int
    iterations: int
    percentile: float
    entropy: dict[str, float] = Field(description="bits of every candidate's rating distribution")
    dropped: dict[str, float] = Field(description="candidates below the entropy threshold (or constant), with their entropy")
    kept: list[str]
    eigenvalues: list[float] = Field(description="of the kept attributes' correlation matrix, largest first")
    thresholds: list[float] = Field(description="the percentile of random data's eigenvalues, rank by rank")
    k95: int = Field(description="leading eigenvalues above their random threshold")
    explained: float = Field(description="share of the kept attributes' variance the first k95 components carry")
    pools: list[PoolSelection]

    def pool(self, k: int) -> PoolSelection:
        return next(p for p in self.pools if p.k == k)


# --------------------------------------------------------------------------- the steps


def rating_entropy(column: np.ndarray) -> float:
    """Shannon entropy (bits) of the ratings rounded to whole scores: a judge that gives one score
    almost always carries almost no information about the attribute, whatever its variance."""
    _, counts = np.unique(np.rint(column).astype(np.int64), return_counts=True)
    shares = counts / counts.sum()
    return float(-(shares * np.log2(shares)).sum())


def correlation_eigen(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (largest first) and eigenvectors of the columns' correlation matrix: PCA on
    standardized ratings, so an attribute rated on a wider spread does not dominate."""
    values, vectors = np.linalg.eigh(np.corrcoef(matrix, rowvar=False))
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def parallel_analysis(n_rows: int, n_cols: int, seed: int, iterations: int = 100, percentile: float = 95.0) -> np.ndarray:
    """Per rank, the percentile of eigenvalues that uncorrelated normal data of the same shape
    reaches by chance; a real component must beat it."""
    rng = np.random.default_rng(seed)
    draws = np.stack([correlation_eigen(rng.standard_normal((n_rows, n_cols)))[0] for _ in range(iterations)])
    return np.percentile(draws, percentile, axis=0)


def count_factors(eigenvalues: np.ndarray, thresholds: np.ndarray) -> int:
    """k95: how many leading components beat their random threshold (at least 1)."""
    above = eigenvalues > thresholds
    leading = len(above) if above.all() else int(np.argmin(above))
    return max(1, leading)


def varimax(loadings: np.ndarray, max_iter: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Orthogonal rotation maximising the variance of squared loadings per component (Kaiser's
    criterion, no row normalisation), so that each component loads on few attributes."""
    n, k = loadings.shape
    if k < 2:
        return loadings.copy()
    rotation = np.eye(k)
    criterion = 0.0
    for _ in range(max_iter):
        rotated = loadings @ rotation
        gradient = loadings.T @ (rotated**3 - rotated * (rotated**2).sum(axis=0) / n)
        u, singular, vt = np.linalg.svd(gradient)
        rotation = u @ vt
        if singular.sum() <= criterion * (1 + tol):
            break
        criterion = singular.sum()
    return loadings @ rotation


def rotated_loadings(eigenvalues: np.ndarray, eigenvectors: np.ndarray, k: int) -> np.ndarray:
    """Varimax of the first k components' loadings, each signed so its strongest loading is positive."""
    rotated = varimax(eigenvectors[:, :k] * np.sqrt(np.clip(eigenvalues[:k], 0.0, None)))
    strongest = rotated[np.argmax(np.abs(rotated), axis=0), np.arange(k)]
    return rotated * np.where(strongest < 0, -1.0, 1.0)


def choose_representatives(loadings: np.ndarray, names: Sequence[str], k: int) -> PoolSelection:
    """One attribute per rotated component, components taken by the variance they carry: the
    attribute loading most strongly on it that no stronger component has taken already."""
    variance = (loadings**2).sum(axis=0)
    taken: set[int] = set()
    factors = []
    for rank, column in enumerate(np.argsort(variance)[::-1], start=1):
        strength = np.abs(loadings[:, column])
        order = [int(i) for i in np.argsort(strength)[::-1]]
        best = next(i for i in order if i not in taken)
        taken.add(best)
        factors.append(FactorChoice(
            factor=rank, attribute=names[best], loading=float(loadings[best, column]),
            variance=float(variance[column]),
            top={names[i]: round(float(loadings[i, column]), 4) for i in order[:TOP_LOADINGS]},
        ))
    return PoolSelection(k=k, factors=factors)


# --------------------------------------------------------------------------- the whole analysis


def select_attributes(
    ratings: np.ndarray,
    names: Sequence[str],
    min_entropy: float = 1.5,
    seed: int = 0,
    iterations: int = 100,
    percentile: float = 95.0,
) -> AttributeSelection:
    """ratings: responses × candidates, finite. Pools for every k in 2..k95 (none when k95 < 2)."""
    ratings = np.asarray(ratings, dtype=np.float64)
    n_rows, n_cols = ratings.shape
    if n_cols != len(names):
        raise SelectionError(f"{len(names)} names for {n_cols} rating columns")
    entropy = {name: rating_entropy(ratings[:, j]) for j, name in enumerate(names)}
    constant = ratings.std(axis=0) == 0
    keep = [j for j, name in enumerate(names) if entropy[name] >= min_entropy and not constant[j]]
    dropped = {names[j]: round(entropy[names[j]], 4) for j in range(n_cols) if j not in keep}
    if len(keep) < 2:
        raise SelectionError(f"only {len(keep)} of {n_cols} attributes pass the entropy filter "
                             f"(>= {min_entropy} bits); the analysis needs at least 2")
    if n_rows < 3:
        raise SelectionError(f"the analysis needs at least 3 rated responses, got {n_rows}")
    kept = [names[j] for j in keep]
    eigenvalues, eigenvectors = correlation_eigen(ratings[:, keep])
    thresholds = parallel_analysis(n_rows, len(keep), seed, iterations, percentile)
    k95 = count_factors(eigenvalues, thresholds)
    pools = [choose_representatives(rotated_loadings(eigenvalues, eigenvectors, k), kept, k) for k in range(2, k95 + 1)]
    return AttributeSelection(
        n_responses=n_rows, n_candidates=n_cols, min_entropy=min_entropy, seed=seed, iterations=iterations,
        percentile=percentile, entropy={n: round(e, 4) for n, e in entropy.items()}, dropped=dropped, kept=kept,
        eigenvalues=[float(v) for v in eigenvalues], thresholds=[float(t) for t in thresholds], k95=k95,
        explained=float(eigenvalues[:k95].sum() / eigenvalues.sum()), pools=pools,
    )
