"""The judge: rates one response on one principle on a 1–10 scale (1 = clearly the opposite).

A failed rating is a `Rating` with `score=None` and the reason; it is skipped and counted by the
reward, never turned into a number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from apm_bench.cache import CacheStats, CallCache, cache_key

SCORE_MIN, SCORE_MAX = 1, 10
SCORE_MIDPOINT = (SCORE_MIN + SCORE_MAX) / 2  # 5.5: a principle neither shown nor opposed


@dataclass(frozen=True)
class RatingRequest:
    prompt: str
    response: str
    principle: str
    seed: int = 0


@dataclass(frozen=True)
class Rating:
    score: float | None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.score is None


class Judge(ABC):
    name: str

    @abstractmethod
    def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
        """One rating per request, in order; deterministic for the same request."""

    def fingerprint(self) -> str:
        """What, besides the request, determines a rating: part of every cache key."""
        return self.name


class CachedJudge(Judge):
    """A judge behind the persistent cache. Failed ratings are not stored, so a rerun asks again."""

    def __init__(self, inner: Judge, cache: CallCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.stats = CacheStats()
        self._fingerprint = inner.fingerprint()

    def fingerprint(self) -> str:
        return self._fingerprint

    def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
        keys = [cache_key("rating", self._fingerprint, r.prompt, r.response, r.principle, r.seed) for r in requests]
        errors: dict[int, str] = {}

        def compute(indices: list[int]) -> list[float | None]:
            ratings = self.inner.rate([requests[i] for i in indices])
            for index, rating in zip(indices, ratings):
                if rating.failed:
                    errors[index] = rating.error or "judge failure"
            return [r.score for r in ratings]

        scores = self.cache.get_or_compute(keys, "rating", compute, self.stats)
        return [
            Rating(score=float(s)) if s is not None else Rating(score=None, error=errors.get(i, "judge failure"))
            for i, s in enumerate(scores)
        ]


def flip_for_side(score: float, side: str) -> float:
    """The avoid side of a principle is scored by mirroring the scale: 11 − s."""
    return score if side == "follow" else SCORE_MIN + SCORE_MAX - score
