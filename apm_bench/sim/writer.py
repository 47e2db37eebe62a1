"""The simulated history writer: wraps neutral requests in phrases that show a user's attributes.

Each active attribute shows in a message with probability `expression` (q); every inactive
attribute leaks in with probability `leak` (r) on a random side, as a distractor. The request
itself is kept verbatim, and no phrase states a preference about the answer.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apm_bench.world.catalog import Catalog, PersonaSeed
from apm_bench.world.users import AttributeSetting


class SimWriterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expression: float = Field(default=0.8, ge=0, le=1, description="q: chance an active attribute shows in a message")
    leak: float = Field(default=0.05, ge=0, le=1, description="r: chance an inactive attribute shows as a distractor")
    persona_mention: float = Field(default=0.15, ge=0, le=1, description="chance a message mentions the persona")


class SimHistoryWriter:
    def __init__(self, catalog: Catalog, config: SimWriterConfig | None = None) -> None:
        self.catalog = catalog
        self.config = config or SimWriterConfig()

    def rewrite(
        self,
        texts: list[str],
        attributes: list[AttributeSetting],
        persona: PersonaSeed | None,
        rng: np.random.Generator,
    ) -> list[str]:
        return [self._rewrite_one(text, attributes, persona, rng) for text in texts]

    def _rewrite_one(
        self, text: str, attributes: list[AttributeSetting], persona: PersonaSeed | None, rng: np.random.Generator
    ) -> str:
        active = {s.attribute: s.side for s in attributes}
        before: list[str] = []
        after: list[str] = []
        for attribute in self.catalog.attributes:
            if attribute.id in active:
                if rng.random() >= self.config.expression:
                    continue
                side = active[attribute.id]
            else:
                if rng.random() >= self.config.leak:
                    continue
                side = "follow" if rng.random() < 0.5 else "avoid"
            phrases = attribute.side(side).phrases
            phrase = phrases[int(rng.integers(len(phrases)))]
            (before if rng.random() < 0.5 else after).append(phrase)
        if persona is not None and rng.random() < self.config.persona_mention:
            before.insert(0, f"I work as {_article(persona.occupation)} {persona.occupation} and I'm into {persona.interests[0]}.")
        return " ".join([*before, text, *after])


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"
