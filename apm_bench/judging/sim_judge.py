"""The simulated judge: measures a principle's markers in a response and maps them onto 1–10.

Noise, a global bias, per-principle biases and a failure rate are configurable, so the benchmark's
defences (sign balancing, failure accounting) can be tested against a judge with known flaws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apm_bench.cache import cache_key
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIDPOINT, SCORE_MIN, Judge, Rating, RatingRequest
from apm_bench.sim.style import StyleCodec, stable_seed
from apm_bench.world.catalog import Principle

POINTS_PER_LEVEL = 2.0
SIM_JUDGE_VERSION = "1"  # bump when scoring changes, so cached ratings are not reused


class SimJudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    noise: float = Field(default=0.75, ge=0, description="std of Gaussian rating noise, in score points")
    bias: float = Field(default=0.0, description="added to every score (a lenient judge has bias > 0)")
    principle_bias: dict[str, float] = Field(default_factory=dict, description="added to one principle's scores")
    failure_rate: float = Field(default=0.0, ge=0, le=1, description="share of ratings that come back unparseable")
    weighted: bool = Field(default=False, description="probability-weighted scores (expectation over 1..10)")


class SimJudge(Judge):
    def __init__(self, principles: list[Principle], config: SimJudgeConfig | None = None) -> None:
        self.config = config or SimJudgeConfig()
        self.codec = StyleCodec(principles)
        self._index = {p.id: i for i, p in enumerate(principles)}
        self.name = "sim-judge" + ("-weighted" if self.config.weighted else "")

    def fingerprint(self) -> str:
        return cache_key(SIM_JUDGE_VERSION, self.name, self.config.model_dump(), [p.model_dump() for p in self.codec.principles])

    def _mean_score(self, request: RatingRequest) -> float:
        feature = self.codec.measure(request.response)[self._index[request.principle]]
        return (
            SCORE_MIDPOINT
            + POINTS_PER_LEVEL * feature
            + self.config.bias
            + self.config.principle_bias.get(request.principle, 0.0)
        )

    def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
        return [self._rate_one(r) for r in requests]

    def _rate_one(self, request: RatingRequest) -> Rating:
        rng = np.random.default_rng(stable_seed("judge", request.seed, request.principle, request.prompt, request.response))
        if rng.random() < self.config.failure_rate:
            return Rating(score=None, error="unparseable judge output")
        mean = self._mean_score(request)
        if self.config.weighted:
            return Rating(score=self._expected_score(mean))
        noisy = mean + self.config.noise * rng.standard_normal()
        return Rating(score=float(np.clip(np.rint(noisy), SCORE_MIN, SCORE_MAX)))

    def _expected_score(self, mean: float) -> float:
        """What a logprob-weighted judge reports: the expectation of a discretised normal on 1..10."""
        scores = np.arange(SCORE_MIN, SCORE_MAX + 1)
        width = max(self.config.noise, 0.5)
        weights = np.exp(-((scores - mean) ** 2) / (2 * width**2))
        return float((scores * weights).sum() / weights.sum())
