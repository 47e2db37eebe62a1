"""The sign-balanced reward and the metrics against the baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apm_bench.judging.judge import Rating
from apm_bench.judging.metrics import bootstrap_ci, compute_metrics
from apm_bench.judging.reward import weighted_reward
from apm_bench.world.users import Target

TARGETS = [Target(principle="casual", side="follow", weight=0.75), Target(principle="gentle", side="avoid", weight=0.25)]


def test_reward_weights_and_flips_avoid_scores() -> None:
    reward = weighted_reward(TARGETS, [Rating(8.0), Rating(3.0)])
    assert reward.value == pytest.approx(0.75 * 8 + 0.25 * (11 - 3))
    assert reward.failed_ratings == 0


def test_failed_ratings_are_skipped_and_counted_never_zero() -> None:
    reward = weighted_reward(TARGETS, [Rating(None, "unparseable"), Rating(3.0)])
    assert reward.value == pytest.approx(8.0)  # only the avoid target counts, renormalised
    assert reward.failed_ratings == 1
    nothing = weighted_reward(TARGETS, [Rating(None, "x"), Rating(None, "y")])
    assert nothing.value is None and nothing.failed_ratings == 2


def test_bootstrap_is_seeded_and_covers_the_mean() -> None:
    values = np.random.default_rng(0).normal(1.0, 1.0, size=200)
    first = bootstrap_ci(values, seed=5)
    assert first == bootstrap_ci(values, seed=5)
    assert first != bootstrap_ci(values, seed=6)
    assert first[0] < values.mean() < first[1]
    assert 0.15 < first[1] - first[0] < 0.45  # ≈ 2 · 1.96 · σ/√n = 0.28
    assert bootstrap_ci(np.full(10, 2.0), seed=0) == (2.0, 2.0)


def test_pooled_bootstrap_resamples_worlds_too() -> None:
    """Two worlds that disagree: the interval must show that the result depends on the draw of C."""
    values = np.concatenate([np.zeros(100), np.full(100, 10.0)])
    strata = np.repeat([0, 1], 100)
    low, high = bootstrap_ci(values, seed=0, strata=strata)
    assert low == pytest.approx(0.0) and high == pytest.approx(10.0)
    agreeing = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    narrow = bootstrap_ci(agreeing, seed=0, strata=strata)
    assert narrow[0] > 1.5 and narrow[1] < 2.5  # worlds that agree keep a tight interval


def _samples() -> pd.DataFrame:
    rows = []
    for world in (0, 1):
        for user in range(4):
            base = 5.0
            rows.append(dict(world=world, user_id=f"u{user}", method="baseline", reward=base, failed_ratings=0))
            rows.append(dict(world=world, user_id=f"u{user}", method="oracle", reward=base + 2, failed_ratings=0))
            method_reward = [base + 1, base + 1, base, base - 1][user]
            rows.append(dict(world=world, user_id=f"u{user}", method="m", reward=method_reward, failed_ratings=1))
    frame = pd.DataFrame(rows)
    frame["baseline_reward"] = 5.0
    return frame


def test_metrics_delta_win_tie_loss_and_gain() -> None:
    metrics = {(m.method, m.world): m for m in compute_metrics(_samples(), seed=0, n_resamples=500)}
    pooled = metrics[("m", "pooled")]
    assert pooled.n_users == 8
    assert pooled.delta == pytest.approx(0.25)
    assert (pooled.win, pooled.tie, pooled.loss) == (0.5, 0.25, 0.25)
    assert pooled.gain == pytest.approx(0.25 / 2.0)
    assert pooled.failed_ratings == 8
    assert metrics[("oracle", "pooled")].gain == pytest.approx(1.0)
    assert metrics[("m", "0")].n_users == 4 and metrics[("m", "1")].delta == pytest.approx(0.25)


def test_unscorable_users_are_counted_not_scored() -> None:
    samples = _samples()
    samples.loc[(samples["method"] == "m") & (samples["user_id"] == "u3"), "reward"] = None
    pooled = next(m for m in compute_metrics(samples, seed=0, n_resamples=200) if m.method == "m" and m.world == "pooled")
    assert pooled.n_users == 6 and pooled.unscorable_users == 2
    assert pooled.delta == pytest.approx(4 / 6)
