"""The generator's context as a budget that methods spend on histories and examples.

A real model has a fixed context; a method that puts a long history or several retrieved examples
into the prompt can exceed it, and the engine would refuse the request. Every method trims the
same way: it builds its prompt from k items (the newest k messages of a history, the k most
similar examples) and keeps the largest k whose prompt still leaves room for the answer. What was
dropped is recorded with the sample, so the report can say how often it happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from apm_bench.backends.base import Backend, GenerationRequest, Message, SamplingParams

Build = Callable[[int], tuple[Message, ...]]
"""Messages built from the first k items of what a method wants to show."""


@dataclass(frozen=True)
class Trimmed:
    messages: tuple[Message, ...]
    #: items left out to fit the context (0: everything fitted, or the engine has no known limit)
    dropped: int


@dataclass
class ContextBudget:
    """The generator's context window less the tokens reserved for the answer. Without a backend
    (the simulator) or a known window there is nothing to trim."""

    backend: Backend | None = None
    answer_tokens: int = 0

    def __post_init__(self) -> None:
        self._window = self.backend.context_window() if self.backend is not None else None

    @property
    def limited(self) -> bool:
        return self._window is not None

    def fits(self, messages: tuple[Message, ...], answer_tokens: int | None = None) -> bool:
        if self.backend is None or self._window is None:
            return True
        request = GenerationRequest(messages=messages, seed=0, params=SamplingParams(max_tokens=1))
        reserve = self.answer_tokens if answer_tokens is None else answer_tokens
        return self.backend.prompt_tokens(request) + reserve <= self._window

    def largest(self, build: Build, count: int, answer_tokens: int | None = None) -> Trimmed:
        """The prompt with as many of `count` items as fit (fitting shrinks as k grows, so a binary
        search finds it); with none fitting, the prompt without items, which the engine then counts
        as a failure if even that is too long. `answer_tokens` overrides the reserve for requests
        with an answer budget of their own (POPI's summaries)."""
        whole = build(count)
        if self.fits(whole, answer_tokens):
            return Trimmed(whole, 0)
        low, high = 0, count - 1  # the largest fitting k lies in [low, high], or there is none
        while low < high:
            middle = (low + high + 1) // 2
            if self.fits(build(middle), answer_tokens):
                low = middle
            else:
                high = middle - 1
        return Trimmed(build(low), count - low)

    def newest(self, history: tuple[str, ...], build: Callable[[tuple[str, ...]], tuple[Message, ...]],
               answer_tokens: int | None = None) -> Trimmed:
        """A history in a prompt, its oldest messages dropped first until the prompt fits."""
        return self.largest(lambda k: build(history[len(history) - k:]), len(history), answer_tokens)


def trimmed_note(dropped: int) -> dict[str, str]:
    """The sample's record of a trim (nothing when nothing was dropped)."""
    return {"context_trimmed": str(dropped)} if dropped else {}
