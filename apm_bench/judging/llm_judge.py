"""The LLM judge: a prompt per (response, principle) on any backend (`judge_prompts`), a strict 1–10
parse or the APM authors' lenient 1–100 one, retries for unparseable answers, a forced answer when
reasoning runs out, and probability-weighted scores where the backend gives logprobs.

Every judge prompt starts with the same system message and then the principle's rubric, so an
engine with prefix caching reuses the shared part across the thousands of ratings of a run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apm_bench.backends.base import Backend, Generation, GenerationRequest, Message, SamplingParams
from apm_bench.backends.reasoning import split_reasoning
from apm_bench.cache import cache_key
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIN, Judge, Rating, RatingRequest
from apm_bench.judging.judge_prompts import (  # noqa: F401 - judge_messages and parse_judge_messages are this module's API too
    JUDGE_SYSTEM,
    JudgePrompt,
    judge_messages,
    parse_judge_messages,
)
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Principle

#: the valid answers, for engines that decode under a structured-output constraint
SCORE_CHOICES = tuple(str(score) for score in range(SCORE_MIN, SCORE_MAX + 1))
#: the answer budget of a forced answer: the number and little else (the authors sample 4 tokens)
FORCED_ANSWER_TOKENS = 8
PAPER_FORCED_ANSWER_TOKENS = 4
#: what closes the reasoning before a continued forced answer, as the authors append it
FORCED_ANSWER_SUFFIX = "</think>\n\nRating: "
_SCORE = re.compile(r"^\D*?\b(10|[1-9])\b\D*$")
_LENIENT_SCORE = re.compile(r"\b(100|[1-9]\d?)\b")


class LLMJudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weighted: bool = Field(default=False, description="expected score over the tokens 1..10 from logprobs")
    retries: int = Field(default=3, ge=0, description="re-asks (with another seed) for unparseable answers")
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=8, ge=1, description="raise for reasoning judges, which think first")
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    top_logprobs: int = Field(default=20, ge=10, le=20)
    constrained: bool = Field(
        default=True,
        description="decode the answer as one of the scores where the engine supports structured outputs "
        "(not for reasoning judges, which must think first)",
    )
    prompt: JudgePrompt = Field(default="rubric", description="'rubric' (apm-bench's) or 'paper' (the authors')")
    scale: Literal[10, 100] = Field(default=10, description="100: rate 1–100 and divide by 10, as the authors do")
    parse: Literal["strict", "lenient"] = Field(
        default="strict", description="strict: the last line is one score; lenient: the last number in range")
    top_p: float = Field(default=1.0, gt=0, le=1)
    forced_answer: Literal["follow-up", "continue"] = Field(
        default="follow-up",
        description="when reasoning runs out: ask again in a new turn, or continue the answer after "
        "'</think>\\n\\nRating: ' for a few tokens, as the authors do")

    @model_validator(mode="after")
    def _weighted_needs_ten_points(self) -> "LLMJudgeConfig":
        if self.weighted and self.scale != 10:
            raise ValueError("a weighted judge reads the scores 1..10 from one token; use scale 10")
        return self


def forced_answer_messages(messages: Sequence[Message], reasoning: str, scale: int = SCORE_MAX) -> tuple[Message, ...]:
    """When the answer budget ran out inside the reasoning: close it and ask for the rating alone
    in a new turn (`forced_answer: continue` continues the answer instead, as the authors do)."""
    closed = reasoning.rstrip() + ("\n</think>" if "<think>" in reasoning else "")
    return (*messages, Message("assistant", closed),
            Message("user", f"Stop reasoning. Rating ({SCORE_MIN}-{scale}), the number only:"))


def forced_answer_prefill(reasoning: str) -> str:
    """The authors' forced answer: the reasoning so far, closed, then "Rating: ", continued as the
    same answer (not a new turn)."""
    return reasoning + FORCED_ANSWER_SUFFIX


def parse_score(text: str) -> int | None:
    """Strict: the answer's last line must hold exactly one integer in 1..10 and no other digits.
    Reasoning before the answer (`<think>…</think>`, `analysis…assistantfinal`) is not read."""
    text, _ = split_reasoning(text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _SCORE.match(lines[-1].strip())
    return int(match.group(1)) if match else None


def parse_hundred(text: str) -> int | None:
    """Strict on the 1–100 scale: the answer's last line is one number and nothing else."""
    answer, _ = split_reasoning(text)
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return int(lines[-1]) if lines and re.fullmatch(r"(100|[1-9]\d?)", lines[-1]) else None


def parse_lenient_score(text: str) -> int | None:
    """The authors' parse: the last number from 1 to 100 in the answer. Unlike theirs it never reads
    a number out of reasoning that was cut off (that answer is forced instead), and reads only the
    answer after finished reasoning, where the authors read the whole text: the answer comes last,
    so the two agree whenever the answer holds a number."""
    answer, unfinished = split_reasoning(text)
    if unfinished:
        return None
    numbers = _LENIENT_SCORE.findall(answer)
    return int(numbers[-1]) if numbers else None


def _probabilities(position: dict[str, float]) -> dict[str, float]:
    return {token.strip(): math.exp(lp) for token, lp in position.items()}


def needs_after_one(top_logprobs: Sequence[dict[str, float]]) -> bool:
    """Whether "10" is two tokens here and "1" has mass: then P(10) needs the distribution after "1"."""
    if not top_logprobs:
        return False
    first = _probabilities(top_logprobs[0])
    return "10" not in first and first.get("1", 0.0) > 0


def expected_score(top_logprobs: Sequence[dict[str, float]], after_one: dict[str, float] | None = None) -> float | None:
    """Expectation over the scores 1..10 from the first answer token's distribution.

    Where "10" is two tokens, P(10) = P("1") · P("0" | "1"), read from `after_one`: the
    distribution of the token that follows a "1" (the second sampled position only when the
    sampled first token was "1"; otherwise a request that forces the "1"). The rest of P("1")
    is the score 1. Mass outside the digits is renormalised away.
    """
    if not top_logprobs:
        return None
    first = _probabilities(top_logprobs[0])
    mass = {score: first.get(str(score), 0.0) for score in range(SCORE_MIN, SCORE_MAX + 1)}
    if needs_after_one(top_logprobs) and after_one is not None:
        second = _probabilities(after_one)
        mass[10] = mass[1] * second.get("0", 0.0)
        mass[1] = mass[1] * (1.0 - sum(second.get(str(d), 0.0) for d in range(10)))
    total = sum(mass.values())
    if total < 0.5:  # the answer was mostly not a score
        return None
    return sum(score * p for score, p in mass.items()) / total


def judge_seed(rating: RatingRequest, attempt: int) -> int:
    """A sampling seed of the rating's own: one seed for a whole world would give every rating the
    same random draws, so a judge whose answer distribution barely depends on the response (a weak
    or random model) would rate every response alike; the same rating still gets the same seed."""
    return stable_seed("judge", rating.seed, rating.principle, rating.prompt, rating.response, attempt)


class LLMJudge(Judge):
    def __init__(self, backend: Backend, principles: list[Principle], config: LLMJudgeConfig | None = None) -> None:
        self.backend = backend
        self.config = config or LLMJudgeConfig()
        self._principles = {p.id: p for p in principles}
        self.name = f"llm-judge:{backend.model}" + (":weighted" if self.config.weighted else "")
        self.scores = tuple(str(score) for score in range(1, self.config.scale + 1))
        self.choices = self.scores if self._constrains(backend) else None
        #: ratings whose reasoning ran out of budget and were asked once more for the number alone
        self.forced_answers = 0
        if self.config.weighted and not backend.capabilities.logprobs:
            raise ValueError(f"backend {backend.name!r} gives no logprobs; a weighted judge needs them")

    def _constrains(self, backend: Backend) -> bool:
        return (self.config.constrained and backend.capabilities.structured_outputs
                and self.config.reasoning_effort is None and not self.config.weighted)

    def fingerprint(self) -> str:
        return cache_key("llm-judge", self.backend.fingerprint(), self.config.model_dump(), JUDGE_SYSTEM)

    def _request(self, rating: RatingRequest, attempt: int) -> GenerationRequest:
        return GenerationRequest(
            messages=judge_messages(self._principles[rating.principle], rating.prompt, rating.response,
                                    self.config.prompt, thinking=self.config.reasoning_effort is not None),
            seed=judge_seed(rating, attempt),
            params=SamplingParams(
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                max_tokens=self.config.max_tokens,
                logprobs=self.config.weighted,
                top_logprobs=self.config.top_logprobs if self.config.weighted else 0,
                reasoning_effort=self.config.reasoning_effort,
                choices=self.choices,
            ),
        )

    def _force_answers(
        self,
        pending: list[int],
        asked: list[GenerationRequest],
        generations: list[Generation],
        scores: list[float | None],
        last_answer: list[str],
    ) -> None:
        """Answers cut off inside their reasoning get one short follow-up that must give the number."""
        cut = [(index, request, generation) for index, request, generation in zip(pending, asked, generations)
               if scores[index] is None and split_reasoning(generation.text)[1]]
        if not cut:
            return
        follow_ups = [self._forced_request(request, generation.text) for _, request, generation in cut]
        for (index, _, _), generation in zip(cut, self.backend.generate(follow_ups)):
            scores[index] = self._read(generation)
            last_answer[index] = generation.text
        self.forced_answers += len(cut)

    def _forced_request(self, request: GenerationRequest, reasoning: str) -> GenerationRequest:
        """A short answer after reasoning that ran out: the authors' continuation of the same answer,
        or a follow-up turn asking for the number (the default: it needs no raw-prompt access)."""
        if self.config.forced_answer == "continue":
            return dataclasses.replace(request, prefill=forced_answer_prefill(reasoning), params=dataclasses.replace(
                request.params, max_tokens=PAPER_FORCED_ANSWER_TOKENS, reasoning_effort=None, choices=None))
        constrained = self.scores if self.backend.capabilities.structured_outputs else None
        return dataclasses.replace(request, messages=forced_answer_messages(request.messages, reasoning, self.config.scale),
                                   params=dataclasses.replace(request.params, max_tokens=FORCED_ANSWER_TOKENS,
                                                              reasoning_effort=None, choices=constrained))

    def _weigh_tens(
        self, pending: list[int], asked: list[GenerationRequest], generations: list[Generation], scores: list[float | None]
    ) -> None:
        """Where "10" is two tokens, P(10) needs the distribution after a "1": the sampled answer's
        second position if it began with "1", else one more token after a forced "1"."""
        follow: list[tuple[int, GenerationRequest]] = []
        for index, request, generation in zip(pending, asked, generations):
            top = generation.top_logprobs or ()
            if not needs_after_one(top):
                continue
            if generation.text.lstrip().startswith("1") and len(top) > 1:
                scores[index] = expected_score(top, top[1])
            else:
                follow.append((index, dataclasses.replace(
                    request, prefill="1", params=dataclasses.replace(request.params, max_tokens=1))))
        if not follow:
            return
        answers = self.backend.generate([request for _, request in follow])
        first_answers = dict(zip(pending, generations))
        for (index, _), answer in zip(follow, answers):
            position = answer.top_logprobs[0] if answer.top_logprobs else None
            scores[index] = expected_score(first_answers[index].top_logprobs or (), position)

    def _read(self, generation: Generation) -> float | None:
        if self.config.weighted:
            return expected_score(generation.top_logprobs or ())
        if self.config.parse == "lenient":
            score = parse_lenient_score(generation.text)
        else:
            score = parse_score(generation.text) if self.config.scale == 10 else parse_hundred(generation.text)
        if score is None or not 1 <= score <= self.config.scale:
            return None
        return float(score) * SCORE_MAX / self.config.scale

    def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
        scores: list[float | None] = [None] * len(requests)
        last_answer: list[str] = [""] * len(requests)
        unsent: dict[int, str] = {}  # a prompt that does not fit the judge's context fails the same way every time
        pending = list(range(len(requests)))
        for attempt in range(self.config.retries + 1):
            if not pending:
                break
            asked = [self._request(requests[i], attempt) for i in pending]
            generations = self.backend.generate(asked)
            for index, generation in zip(pending, generations):
                scores[index] = self._read(generation)
                last_answer[index] = generation.text
                if generation.error is not None:
                    unsent[index] = generation.error
            self._force_answers(pending, asked, generations, scores, last_answer)
            if self.config.weighted:
                self._weigh_tens(pending, asked, generations, scores)
            pending = [i for i in pending if scores[i] is None and i not in unsent]
        return [
            Rating(score=s) if s is not None
            else Rating(score=None, error=unsent.get(i) or f"unparseable judge output: {last_answer[i][:80]!r}")
            for i, s in enumerate(scores)
        ]
