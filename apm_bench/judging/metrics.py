"""Metrics: every method against the unpersonalized baseline on the same test users.

Δ = mean over users of R(method) − R(baseline), with a seeded percentile bootstrap 95 % CI that
resamples worlds and users within them (so the interval carries the variance between draws of C);
win / tie / loss rates of the per-user differences; gain = Δ(method) / Δ(oracle).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel

TIE_TOLERANCE = 1e-9


class MethodMetrics(BaseModel):
    method: str
    world: str  # a world seed, or "pooled"
    n_users: int
    mean_reward: float
    baseline_reward: float
    delta: float
    ci_low: float
    ci_high: float
    win: float
    tie: float
    loss: float
    gain: float | None = None
    failed_ratings: int = 0
    unscorable_users: int = 0
    #: responses never generated because the prompt did not fit the generator's context
    failed_generations: int = 0
    #: prompts whose history or examples were cut to fit the generator's context
    trimmed_prompts: int = 0


def _resampled_sums(values: np.ndarray, n_resamples: int, rng: np.random.Generator, cells: int = 2**22) -> np.ndarray:
    chunk = max(1, cells // max(values.size, 1))
    return np.concatenate([values[rng.integers(0, values.size, size=(min(chunk, n_resamples - start), values.size))].sum(axis=1)
                           for start in range(0, n_resamples, chunk)])


def bootstrap_ci(
    values: np.ndarray,
    seed: int,
    n_resamples: int = 2000,
    strata: np.ndarray | None = None,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of the mean by a seeded two-level bootstrap: worlds, then users within them.

    Each world is one draw of the hidden mapping C, and a method's Δ varies between draws (a
    stereotype can happen to agree with C in one world). Resampling worlds as well as users puts
    that variance into the interval; with a single world it is the ordinary user bootstrap.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    strata = np.zeros(values.size, dtype=int) if strata is None else np.asarray(strata)
    groups = [values[strata == s] for s in np.unique(strata)]
    sizes = np.array([g.size for g in groups], dtype=float)
    # Bootstrap sums of users within every world, one column per resample; drawn in chunks (the same
    # stream as one draw) so memory stays bounded however many resamples are asked for.
    sums = np.stack([_resampled_sums(g, n_resamples, rng) for g in groups])
    if len(groups) == 1:
        means = sums[0] / sizes[0]
    else:
        picks = rng.integers(0, len(groups), size=(n_resamples, len(groups)))
        columns = np.arange(n_resamples)[:, None]
        means = sums[picks, columns].sum(axis=1) / sizes[picks].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def method_metrics(
    samples: pd.DataFrame, method: str, world_label: str, seed: int, n_resamples: int = 2000
) -> MethodMetrics:
    """`samples` holds one row per (world, user) with `reward`, `baseline_reward`, `failed_ratings`."""
    failed = int(samples["failed_ratings"].sum())
    scorable = samples.dropna(subset=["reward", "baseline_reward"])
    diff = (scorable["reward"] - scorable["baseline_reward"]).to_numpy()
    low, high = bootstrap_ci(diff, seed, n_resamples, strata=scorable["world"].to_numpy())
    n = diff.size
    return MethodMetrics(
        method=method,
        world=world_label,
        n_users=n,
        mean_reward=float(scorable["reward"].mean()) if n else float("nan"),
        baseline_reward=float(scorable["baseline_reward"].mean()) if n else float("nan"),
        delta=float(diff.mean()) if n else float("nan"),
        ci_low=low,
        ci_high=high,
        win=float((diff > TIE_TOLERANCE).mean()) if n else float("nan"),
        tie=float((np.abs(diff) <= TIE_TOLERANCE).mean()) if n else float("nan"),
        loss=float((diff < -TIE_TOLERANCE).mean()) if n else float("nan"),
        failed_ratings=failed,
        unscorable_users=len(samples) - n,
        failed_generations=int(samples["generation_error"].notna().sum()) if "generation_error" in samples else 0,
        trimmed_prompts=int((samples["context_trimmed"] > 0).sum()) if "context_trimmed" in samples else 0,
    )


def compute_metrics(
    samples: pd.DataFrame, seed: int, n_resamples: int = 2000, oracle_method: str = "oracle"
) -> list[MethodMetrics]:
    """Per world and pooled metrics for every method in `samples` except the baseline itself."""
    results: list[MethodMetrics] = []
    for method, rows in samples.groupby("method", sort=False):
        for world, world_rows in rows.groupby("world", sort=True):
            results.append(method_metrics(world_rows, str(method), str(world), seed, n_resamples))
        results.append(method_metrics(rows, str(method), "pooled", seed, n_resamples))
    oracle_delta = {m.world: m.delta for m in results if m.method == oracle_method}
    for metric in results:
        reference = oracle_delta.get(metric.world)
        if reference is not None and reference > TIE_TOLERANCE:
            metric.gain = metric.delta / reference
    return results
