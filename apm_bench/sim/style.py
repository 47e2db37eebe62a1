"""Style vectors ↔ text: how the simulator writes a response and how anything measures one.

A style vector z holds one intensity level in {−2, …, 2} per principle. Rendering inserts |z_p|
marker sentences of principle p (follow markers when z_p > 0, avoid markers when z_p < 0) among
content sentences about the prompt; measuring counts markers back. Measuring works on any text,
so the judge can rate responses no simulator wrote.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from apm_bench.world.catalog import Principle

LEVELS = np.arange(-2, 3)
MAX_LEVEL = int(LEVELS.max())

_CONTENT_TEMPLATES = (
    "The core of this comes down to {a}.",
    "A useful starting point is {a}.",
    "It helps to look at {a} and {b} together.",
    "Most of the work lies in {b}.",
    "In practice, {a} matters more than people expect.",
    "Keep {c} in mind as you go.",
    "The usual approach starts with {b} and then turns to {c}.",
    "Getting {a} right makes the rest easier.",
    "A common mistake involves {c}.",
    "The answer depends partly on {b}.",
    "Small changes to {a} can have a large effect.",
    "Think of {c} as the last piece.",
)
_STOPWORDS = frozenset(
    "about after again also because before being between could does doing during every from have "
    "having into just know like make many more most much need other over really should some such "
    "than that their them then there these they thing think this those through under until very "
    "want what when where which while will with would your yours".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{4,}")


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any printable parts; stable across processes (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def topic_words(prompt: str, count: int = 3) -> list[str]:
    """The request's salient words: from its last question if it has one, else from the whole text."""
    sentences = re.split(r"(?<=[.!?])\s+", prompt.strip())
    questions = [s for s in sentences if s.endswith("?")]
    source = questions[-1] if questions else prompt
    words = [w.lower() for w in _WORD.findall(source) if w.lower() not in _STOPWORDS]
    words = list(dict.fromkeys(words)) or ["the question"]
    return (words * count)[:count]


class StyleCodec:
    """Renders style vectors into text and measures them back, for one principle pool."""

    def __init__(self, principles: list[Principle]) -> None:
        self.principles = principles
        self._markers = [(p.sim.follow_markers, p.sim.avoid_markers) for p in principles]
        lookup: dict[str, tuple[int, int]] = {}
        for index, (follow, avoid) in enumerate(self._markers):
            lookup.update({m: (index, 1) for m in follow})
            lookup.update({m: (index, -1) for m in avoid})
        self._lookup = lookup
        ordered = sorted(lookup, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(m) for m in ordered))

    @property
    def size(self) -> int:
        return len(self.principles)

    def render(self, prompt: str, style: np.ndarray, rng: np.random.Generator) -> str:
        a, b, c = topic_words(prompt)
        order = rng.permutation(len(_CONTENT_TEMPLATES))[:3]
        sentences = [_CONTENT_TEMPLATES[i].format(a=a, b=b, c=c) for i in order]
        for index, level in enumerate(style.astype(int)):
            if level == 0:
                continue
            bank = self._markers[index][0 if level > 0 else 1]
            picks = rng.choice(len(bank), size=min(abs(level), len(bank)), replace=False)
            sentences.extend(bank[i] for i in picks)
        first, rest = sentences[0], sentences[1:]
        shuffled = [rest[i] for i in rng.permutation(len(rest))]
        return " ".join([first, *shuffled])

    def measure(self, text: str) -> np.ndarray:
        """Per principle: follow markers found minus avoid markers found."""
        features = np.zeros(self.size)
        for match in self._pattern.finditer(text):
            index, sign = self._lookup[match.group(0)]
            features[index] += sign
        return features

    def measure_many(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.measure(t) for t in texts]) if texts else np.zeros((0, self.size))

    def levels(self, text: str) -> np.ndarray:
        """The style vector a text expresses, clipped to the level range (for log-probabilities)."""
        return np.clip(self.measure(text), -MAX_LEVEL, MAX_LEVEL).astype(int)
