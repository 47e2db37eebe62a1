"""How the simulated model reads its context.

A real LLM picks up four kinds of cues, and so does the simulator:
- explicit style instructions (`FOLLOW Casual` / `AVOID Casual`, see `apm_bench.world.prompting`);
- free-text talk about a preference ("prefers relaxed, informal answers"), through the catalog's
  keywords, with simple negation;
- example responses marked as preferred / dispreferred, whose measured style it imitates;
- the user's own writing, whose attribute phrases trigger stereotyped style shifts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from apm_bench.backends.base import Message
from apm_bench.sim.style import MAX_LEVEL, StyleCodec
from apm_bench.world.catalog import Attribute, Principle
from apm_bench.world.prompting import BEST_TAG, SIDE_WORDS, WORST_TAG, paper_sentence

_NEGATIONS = frozenset("not no avoid avoids avoiding without never dislike dislikes less hates hate non".split())
_TAGGED = re.compile(r"<(prompt|best_response|worst_response)>.*?</\1>", re.DOTALL)
MEMO_SIZE = 100_000  # entries a simulator memo keeps (a small array each) before it starts afresh

K = TypeVar("K")


def memoised(memo: dict[K, np.ndarray], key: K, compute: Callable[[K], np.ndarray]) -> np.ndarray:
    """`memo[key]`, computed on first use; a full memo is emptied rather than grown without bound.
    The simulator reads the same messages, contexts and responses over and over (every candidate,
    every training epoch), and reading is the slow part of it."""
    found = memo.get(key)
    if found is None:
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        found = memo[key] = compute(key)
    return found


class ContextReader:
    """Turns a conversation into the feature rows the simulator's policy consumes."""

    def __init__(self, principles: list[Principle], attributes: list[Attribute], codec: StyleCodec) -> None:
        self.n_principles = len(principles)
        self.n_attributes = len(attributes)
        self.codec = codec
        # names as the catalog writes them ("FOLLOW Casual") or as the authors' instructions do ("FOLLOW casual")
        names = {p.name.lower(): i for i, p in enumerate(principles)}
        self._names = names
        self._instruction = re.compile(
            r"\b(" + "|".join(SIDE_WORDS.values()) + r") ((?i:" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r"))\b"
        )
        self._instruction_texts = [t for p in principles for t in (p.follow_instruction, p.avoid_instruction)] + [
            paper_sentence(p, side) for p in principles for side in ("follow", "avoid")]
        keyword_sign: dict[str, tuple[int, int]] = {}
        for index, principle in enumerate(principles):
            keyword_sign.update({k.lower(): (index, 1) for k in principle.keywords})
            keyword_sign.update({k.lower(): (index, -1) for k in principle.opposite_keywords})
        self._keyword_sign = keyword_sign
        self._keywords = re.compile(
            r"\b(" + "|".join(re.escape(k) for k in sorted(keyword_sign, key=len, reverse=True)) + r")\b"
        )
        phrase_sign: dict[str, tuple[int, int]] = {}
        for index, attribute in enumerate(attributes):
            phrase_sign.update({ph: (index, 1) for ph in attribute.follow.phrases})
            phrase_sign.update({ph: (index, -1) for ph in attribute.avoid.phrases})
        self._phrase_sign = phrase_sign
        self._phrases = re.compile("|".join(re.escape(p) for p in sorted(phrase_sign, key=len, reverse=True)))
        #: a phrase never spans two messages, so a conversation's evidence is the sum of its messages'
        self._per_message = not any("\n" in phrase for phrase in phrase_sign)
        self._evidence_memo: dict[str, np.ndarray] = {}
        self._best = re.compile(rf"<{BEST_TAG}>(.*?)</{BEST_TAG}>", re.DOTALL)
        self._worst = re.compile(rf"<{WORST_TAG}>(.*?)</{WORST_TAG}>", re.DOTALL)

    @property
    def width(self) -> int:
        """Features per request: instructions, keywords, imitation (P each), attributes (A), a constant 1."""
        return 3 * self.n_principles + self.n_attributes + 1

    def read(self, messages: Sequence[Message]) -> np.ndarray:
        everything = "\n".join(m.content for m in messages)
        system = "\n".join(m.content for m in messages if m.role == "system")
        return np.concatenate(
            [
                self.instructions(everything),
                self.keywords(system),
                self.imitation(system),
                np.sign(self.messages_evidence([m.content for m in messages])),
                [1.0],
            ]
        )

    def read_many(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        return np.stack([self.read(c) for c in conversations]) if conversations else np.zeros((0, self.width))

    def instructions(self, text: str) -> np.ndarray:
        values = np.zeros(self.n_principles)
        for side_word, name in self._instruction.findall(text):
            values[self._names[name.lower()]] = 1.0 if side_word == SIDE_WORDS["follow"] else -1.0
        return values

    def keywords(self, system_text: str) -> np.ndarray:
        """Preference talk outside instructions, histories and examples; 'not formal' counts as casual."""
        text = _TAGGED.sub(" ", system_text)
        for instruction in self._instruction_texts:
            text = text.replace(instruction, " ")
        text = self._instruction.sub(" ", text).lower()
        values = np.zeros(self.n_principles)
        for match in self._keywords.finditer(text):
            index, sign = self._keyword_sign[match.group(1)]
            preceding = re.findall(r"[a-z']+", text[max(0, match.start() - 30) : match.start()])[-3:]
            if _NEGATIONS.intersection(preceding):
                sign = -sign
            values[index] += sign
        return np.clip(values, -1.0, 1.0)

    def imitation(self, system_text: str) -> np.ndarray:
        """Measured style of preferred examples minus dispreferred ones, scaled to [−1, 1]."""
        best = [self.codec.measure(t) for t in self._best.findall(system_text)]
        worst = [self.codec.measure(t) for t in self._worst.findall(system_text)]
        if not best and not worst:
            return np.zeros(self.n_principles)
        signal = (np.mean(best, axis=0) if best else 0.0) - (np.mean(worst, axis=0) if worst else 0.0)
        return np.clip(np.asarray(signal, dtype=float) / (2 * MAX_LEVEL), -1.0, 1.0)

    def attribute_evidence(self, text: str) -> np.ndarray:
        """Per attribute: phrases of its follow side found minus phrases of its avoid side."""
        values = np.zeros(self.n_attributes)
        for match in self._phrases.finditer(text):
            index, sign = self._phrase_sign[match.group(0)]
            values[index] += sign
        return values

    def messages_evidence(self, texts: Sequence[str]) -> np.ndarray:
        """The evidence of messages read together, each message's memoised: the same prompts and
        history messages come back in thousands of contexts, and the phrase search is the slow part
        of reading one."""
        if not self._per_message:
            return self.attribute_evidence("\n".join(texts))
        total = np.zeros(self.n_attributes)
        for text in texts:
            total += memoised(self._evidence_memo, text, self.attribute_evidence)
        return total
