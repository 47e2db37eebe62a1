"""The history writer on a real engine: an LLM rewrites neutral prompts to show a user's attributes.

It lives with the engines because it is one of their roles; the simulator's own writer is
`apm_bench.sim.writer`. Both satisfy `apm_bench.world.histories.HistoryWriter`.
"""

from __future__ import annotations

import numpy as np

from apm_bench.backends.base import Backend, GenerationRequest, Message, SamplingParams
from apm_bench.world.catalog import Catalog, PersonaSeed
from apm_bench.world.users import AttributeSetting

REWRITE_SYSTEM = (
    "You rewrite a user's request so that it reads as if written by a particular person. Keep the "
    "request itself unchanged: same question, same task, same facts. Change only how it is written, "
    "so that the person's traits show. Never add anything about how the answer should be written "
    "(no wishes about tone, length, detail, format or style). Reply with the rewritten request only."
)


def rewrite_instruction(catalog: Catalog, attributes: list[AttributeSetting], persona: PersonaSeed | None) -> str:
    """The paper's phrasing: the person is "VERY x" / "NOT AT ALL y", each with how that shows."""
    traits = []
    for setting in attributes:
        attribute = catalog.attribute(setting.attribute)
        degree = "VERY" if setting.side == "follow" else "NOT AT ALL"
        traits.append(f"- {degree} {attribute.name.lower()}: {attribute.side(setting.side).description}")
    who = f"The person is a {persona.occupation}.\n" if persona else ""
    return who + "Their writing is:\n" + "\n".join(traits)


class LLMHistoryWriter:
    """Rewrites neutral prompts with a language model (the paper used gpt-oss-120b).

    Requests are seeded from the population's random generator, so the same data seed sends the
    same requests; an empty rewrite keeps the neutral text rather than inventing one.
    """

    def __init__(self, backend: Backend, catalog: Catalog, temperature: float = 1.0, max_tokens: int = 1024) -> None:
        self.backend = backend
        self.catalog = catalog
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.empty_rewrites = 0

    def rewrite(
        self,
        texts: list[str],
        attributes: list[AttributeSetting],
        persona: PersonaSeed | None,
        rng: np.random.Generator,
    ) -> list[str]:
        instruction = rewrite_instruction(self.catalog, attributes, persona)
        base_seed = int(rng.integers(2**31))
        requests = [
            GenerationRequest(
                messages=(
                    Message("system", REWRITE_SYSTEM),
                    Message("user", f"{instruction}\n\nRequest to rewrite:\n{text}"),
                ),
                seed=base_seed + index,
                params=SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens),
            )
            for index, text in enumerate(texts)
        ]
        rewritten = []
        for text, generation in zip(texts, self.backend.generate(requests)):
            if generation.text.strip():
                rewritten.append(generation.text.strip())
            else:
                self.empty_rewrites += 1
                rewritten.append(text)
        return rewritten
