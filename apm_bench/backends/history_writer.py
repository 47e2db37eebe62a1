"""The history writer on a real engine: an LLM rewrites neutral prompts to show a user's attributes.

It lives with the engines because it is one of their roles; the simulator's own writer is
`apm_bench.sim.writer`. Both satisfy `apm_bench.world.histories.HistoryWriter`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from apm_bench.backends.base import Backend, Generation, GenerationRequest, Message, SamplingParams
from apm_bench.backends.reasoning import split_reasoning
from apm_bench.world.catalog import Catalog, PersonaSeed
from apm_bench.world.users import AttributeSetting

WriterPrompt = Literal["apm-bench", "paper"]

REWRITE_SYSTEM = (
    "You rewrite a user's request so that it reads as if written by a particular person. Keep the "
    "request itself unchanged: same question, same task, same facts. Change only how it is written, "
    "so that the person's traits show. Never add anything about how the answer should be written "
    "(no wishes about tone, length, detail, format or style). Reply with the rewritten request only."
)


#: the authors' rewrite prompt (their synthetic-conversation script), verbatim
PAPER_REWRITE_SYSTEM = (
    "\nYour task: Rewrite the highlighted user prompt to match a described persona. Output only the rewritten "
    "prompt, nothing else.\n\nRules:\n- Preserve the core meaning, intent, and information content of the original "
    "prompt.\n- Only rewrite and output the \"prompt_to_rewrite\" message, the preceding conversation is just for "
    "context.\n- Change the way it is expressed \u2014 word choice, sentence structure, tone, and register \u2014 to "
    "match the target style. Apply the style NATURALLY \u2014 the rewrite should still sound like a real person, not "
    "a caricature. Less is more!\n- Do not mention any style attribute explicitly in the rewritten prompt.\n- Keep "
    "roughly the same length unless the style naturally calls for shorter or longer phrasing (e.g., a terse style "
    "should be shorter, a verbose style should be longer).\n"
)
PAPER_REWRITE_USER = (
    "\nRewrite the highlighted user prompt to match a described persona. Output only the rewritten prompt, nothing "
    "else.\n\n<conversation>\n{conversation}\n</conversation>\n\n<prompt_to_rewrite>\n{prompt}\n"
    "</prompt_to_rewrite>\n\n<persona>\nThe simulated user is...\n{attributes}\n</persona>\n"
)


def paper_attributes(catalog: Catalog, attributes: list[AttributeSetting]) -> str:
    """The authors' persona lines: bare attribute names, "VERY: a, b" then "NOT AT ALL: c"."""
    names = {side: [catalog.attribute(s.attribute).name.lower() for s in attributes if s.side == side]
             for side in ("follow", "avoid")}
    lines = [f"VERY: {', '.join(names['follow'])}"] if names["follow"] else []
    return "\n".join(lines + ([f"NOT AT ALL: {', '.join(names['avoid'])}"] if names["avoid"] else []))


def rewrite_instruction(catalog: Catalog, attributes: list[AttributeSetting], persona: PersonaSeed | None) -> str:
    """The paper's phrasing: the person is "VERY x" / "NOT AT ALL y", each with how that shows."""
    traits = []
    for setting in attributes:
        attribute = catalog.attribute(setting.attribute)
        degree = "VERY" if setting.side == "follow" else "NOT AT ALL"
        traits.append(f"- {degree} {attribute.name.lower()}: {attribute.side(setting.side).description}")
    who = f"The person is a {persona.occupation}.\n" if persona else ""
    return who + "Their writing is:\n" + "\n".join(traits)


def rewrite_messages(catalog: Catalog, text: str, attributes: list[AttributeSetting], persona: PersonaSeed | None,
                     prompt: WriterPrompt = "apm-bench") -> tuple[Message, ...]:
    """What the writer model is asked for one history message."""
    if prompt == "paper":  # each history message opens a conversation of its own: no preceding turns
        user = PAPER_REWRITE_USER.format(conversation="", prompt=text, attributes=paper_attributes(catalog, attributes))
        return (Message("system", PAPER_REWRITE_SYSTEM), Message("user", user))
    instruction = rewrite_instruction(catalog, attributes, persona)
    return (Message("system", REWRITE_SYSTEM), Message("user", f"{instruction}\n\nRequest to rewrite:\n{text}"))


class LLMHistoryWriter:
    """Rewrites neutral prompts with a language model (the paper used gpt-oss-120b).

    Requests are seeded from the population's random generator, so the same data seed sends the
    same requests. A reasoning model's thinking is never taken as the rewrite. A user with an empty
    rewrite, or one whose reasoning ran out before any rewrite, is discarded, never given the neutral
    text in its place: that user would show no attributes and still count. A rewrite cut off by the
    token budget is kept (a long rewrite is still one), unless `discard_truncated` (the authors
    discard those users too).
    """

    def __init__(self, backend: Backend, catalog: Catalog, temperature: float = 1.0, max_tokens: int = 1024,
                 prompt: WriterPrompt = "apm-bench", discard_truncated: bool = False) -> None:
        self.backend = backend
        self.catalog = catalog
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.discard_truncated = discard_truncated
        self.failed_rewrites = 0
        self.truncated_rewrites = 0

    def messages(self, text: str, attributes: list[AttributeSetting], persona: PersonaSeed | None) -> tuple[Message, ...]:
        return rewrite_messages(self.catalog, text, attributes, persona, self.prompt)

    def rewrite(
        self,
        texts: list[str],
        attributes: list[AttributeSetting],
        persona: PersonaSeed | None,
        rng: np.random.Generator,
    ) -> list[str] | None:
        base_seed = int(rng.integers(2**31))
        requests = [
            GenerationRequest(
                messages=self.messages(text, attributes, persona),
                seed=base_seed + index,
                params=SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens),
            )
            for index, text in enumerate(texts)
        ]
        rewritten = [self.read(generation) for generation in self.backend.generate(requests)]
        failed = sum(text is None for text in rewritten)
        self.failed_rewrites += failed
        return None if failed else [text for text in rewritten if text is not None]

    def read(self, generation: Generation) -> str | None:
        """The rewrite after any reasoning; None when there is none (empty, unsent, reasoning cut
        off) or, with `discard_truncated`, when the token budget cut it."""
        answer, unfinished = split_reasoning(generation.text)
        if generation.failed or unfinished or not answer.strip():
            return None
        if generation.completion_tokens >= self.max_tokens:
            self.truncated_rewrites += 1
            if self.discard_truncated:
                return None
        return answer.strip()
