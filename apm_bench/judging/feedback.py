"""The feedback oracle: the only channel through which a method learns what users prefer.

It answers for fit users (train and validation) and refuses test users. It is built from those
users' targets only, so nothing reachable from it can reveal a test user's preference.
"""

from __future__ import annotations

import numpy as np

from apm_bench.errors import InformationBarrierError
from apm_bench.judging.candidates import Candidate, CandidateBank
from apm_bench.judging.judge import RatingRequest
from apm_bench.judging.reward import weighted_reward
from apm_bench.world.users import Target

#: decimals a score keeps: differences below this are float noise of the path a rating came by
#: (probability-weighted scores through an HTTP server's logprobs differ in the 15th digit), and
#: must not break a method's ties differently from one engine to the next
SCORE_DECIMALS = 9


def _settled(value: float | None) -> float | None:
    return None if value is None else round(value, SCORE_DECIMALS)


class FeedbackOracle:
    def __init__(self, bank: CandidateBank, fit_targets: dict[str, list[Target]]) -> None:
        self._bank = bank
        self._targets = dict(fit_targets)
        self.calls = 0
        bank.ensure_ratings((uid, t.principle) for uid, targets in self._targets.items() for t in targets)

    @property
    def labels(self):  # type: ignore[no-untyped-def]
        return self._bank.labels

    def _check(self, user_id: str) -> list[Target]:
        if user_id not in self._targets:
            raise InformationBarrierError(f"no feedback for user {user_id!r}: it is not a training user")
        return self._targets[user_id]

    def candidates(self, user_id: str) -> list[Candidate]:
        self._check(user_id)
        return self._bank.candidates(user_id)

    def score(self, user_id: str, candidate: Candidate) -> float | None:
        """The user's weighted score of one candidate (None when every rating of it failed)."""
        targets = self._check(user_id)
        if candidate.user_id != user_id:
            raise InformationBarrierError("candidates are scored only for the user they were written for")
        self.calls += 1
        index = self._bank.labels.index(candidate.label)
        ratings = [self._bank.rating(user_id, index, t.principle) for t in targets]
        return _settled(weighted_reward(targets, ratings).value)

    def score_responses(self, user_ids: list[str], prompts: list[str], responses: list[str], seed: int = 0) -> list[float | None]:
        """Weighted scores of arbitrary responses (e.g. written under a candidate summary), judged now."""
        targets = [self._check(uid) for uid in user_ids]
        requests = [
            RatingRequest(prompt=p, response=r, principle=t.principle, seed=seed)
            for p, r, user_targets in zip(prompts, responses, targets)
            for t in user_targets
        ]
        ratings = iter(self._bank.judge.rate(requests))
        self.calls += len(user_ids)
        return [_settled(weighted_reward(user_targets, [next(ratings) for _ in user_targets]).value) for user_targets in targets]

    def scores(self, user_id: str) -> np.ndarray:
        """Scores of all 2P candidates in label order, NaN where unscorable."""
        return np.array(
            [np.nan if (s := self.score(user_id, c)) is None else s for c in self.candidates(user_id)]
        )
