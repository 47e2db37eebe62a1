"""Candidates: for a user's prompt, one response under each of the 2P style instructions.

Candidates and their ratings do not depend on the hidden mapping C, so the bank is built once per
population and shared by all worlds; only how a rating turns into a user's score changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from apm_bench.backends.base import Backend, GenerationRequest, SamplingParams, chat
from apm_bench.judging.judge import Judge, Rating, RatingRequest
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Catalog, Side
from apm_bench.world.prompting import InstructionTexts, style_instruction


@dataclass(frozen=True)
class StyleLabel:
    principle: str
    side: Side

    @property
    def name(self) -> str:
        return f"{self.side}:{self.principle}"


def style_labels(catalog: Catalog) -> list[StyleLabel]:
    """The 2P labels: every principle followed, then every principle avoided."""
    return [StyleLabel(p, side) for side in ("follow", "avoid") for p in catalog.principle_ids]


@dataclass(frozen=True)
class Candidate:
    user_id: str
    prompt: str
    label: StyleLabel
    text: str
    #: why the candidate writer produced nothing (its prompt did not fit): never rated, counted
    error: str | None = None


class CandidateBank:
    """Generates candidates on demand and memoises their ratings per principle."""

    def __init__(self, writer: Backend, judge: Judge, catalog: Catalog, seed: int = 0, max_tokens: int = 1024,
                 texts: InstructionTexts = "apm-bench") -> None:
        self.writer = writer
        self.params = SamplingParams(max_tokens=max_tokens)
        self.judge = judge
        self.catalog = catalog
        self.texts = texts
        self.labels = style_labels(catalog)
        self.seed = seed
        self._candidates: dict[str, list[Candidate]] = {}
        self._ratings: dict[tuple[str, int, str], Rating] = {}
        self.generation_calls = 0
        self.rating_calls = 0

    def ensure(self, prompts: dict[str, str]) -> None:
        """Generate the candidates of every listed user that has none yet, in one batch."""
        missing = [uid for uid in prompts if uid not in self._candidates]
        requests = [
            GenerationRequest(
                messages=chat(prompts[uid], system=style_instruction(self.catalog.principle(label.principle), label.side, self.texts)),
                seed=stable_seed("candidate", self.seed, uid, label.name),
                params=self.params,
            )
            for uid in missing
            for label in self.labels
        ]
        generations = self.writer.generate(requests)
        self.generation_calls += len(requests)
        width = len(self.labels)
        for row, uid in enumerate(missing):
            texts = generations[row * width : (row + 1) * width]
            self._candidates[uid] = [
                Candidate(uid, prompts[uid], label, g.text, g.error) for label, g in zip(self.labels, texts)
            ]

    def candidates(self, user_id: str) -> list[Candidate]:
        return self._candidates[user_id]

    def ensure_ratings(self, needs: Iterable[tuple[str, str]]) -> None:
        """Rate every candidate of each (user, principle) pair not rated yet, in one batch."""
        keys = []
        for user_id, principle in needs:
            for index in range(len(self.labels)):
                key = (user_id, index, principle)
                if key not in self._ratings:
                    keys.append(key)
        keys = list(dict.fromkeys(keys))
        for uid, i, principle in keys:
            error = self._candidates[uid][i].error
            if error is not None:
                self._ratings[(uid, i, principle)] = Rating(score=None, error=f"no candidate: {error}")
        keys = [key for key in keys if key not in self._ratings]
        requests = [
            RatingRequest(
                prompt=self._candidates[uid][i].prompt,
                response=self._candidates[uid][i].text,
                principle=principle,
                seed=self.seed,
            )
            for uid, i, principle in keys
        ]
        self.rating_calls += len(requests)
        for key, rating in zip(keys, self.judge.rate(requests)):
            self._ratings[key] = rating

    def rating(self, user_id: str, index: int, principle: str) -> Rating:
        return self._ratings[(user_id, index, principle)]
