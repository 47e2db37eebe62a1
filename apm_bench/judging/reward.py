"""The sign-balanced reward of a response for one user.

R_u = Σ_t w_t · s̃_t / Σ_t w_t over the user's targets, with s̃ = s for follow and 11 − s for
avoid. Because each target's side is random, a judge that rates some principle high regardless
of the response raises half the users' rewards and lowers the other half's: its bias cancels.
Failed ratings are left out of both sums and counted; if every rating fails the reward is None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apm_bench.judging.judge import Rating, flip_for_side
from apm_bench.world.users import Target


@dataclass(frozen=True)
class Reward:
    value: float | None
    failed_ratings: int


def weighted_reward(targets: Sequence[Target], ratings: Sequence[Rating]) -> Reward:
    if len(targets) != len(ratings):
        raise ValueError("one rating per target is needed")
    numerator = 0.0
    denominator = 0.0
    failed = 0
    for target, rating in zip(targets, ratings):
        if rating.score is None:
            failed += 1
            continue
        numerator += target.weight * flip_for_side(rating.score, target.side)
        denominator += target.weight
    return Reward(value=numerator / denominator if denominator > 0 else None, failed_ratings=failed)
