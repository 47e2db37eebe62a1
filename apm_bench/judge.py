"""The judge: rates one response on one principle on a 1–10 scale (1 = clearly the opposite).

A failed rating is a `Rating` with `score=None` and the reason; it is skipped and counted by the
reward, never turned into a number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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


def flip_for_side(score: float, side: str) -> float:
    """The avoid side of a principle is scored by mirroring the scale: 11 − s."""
    return score if side == "follow" else SCORE_MIN + SCORE_MAX - score
