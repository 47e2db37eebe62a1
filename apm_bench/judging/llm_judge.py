"""The LLM judge: a rubric prompt per (response, principle) on any backend, a strict 1–10 parse,
retries for unparseable answers, and probability-weighted scores where the backend gives logprobs.

Every judge prompt starts with the same system message and then the principle's rubric, so an
engine with prefix caching reuses the shared part across the thousands of ratings of a run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from apm_bench.backends.base import Backend, Generation, GenerationRequest, Message, SamplingParams
from apm_bench.cache import cache_key
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIN, Judge, Rating, RatingRequest
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Principle

JUDGE_SYSTEM = (
    "You are an impartial expert evaluator of writing style. You rate ONLY how strongly an AI "
    "response exhibits one given principle, ignoring its correctness, helpfulness and every other "
    f"quality. Use a scale from {SCORE_MIN} (clearly exhibits the opposite of the principle) to "
    f"{SCORE_MAX} (a perfect example of the principle). Answer with the number only."
)
_PRINCIPLE = re.compile(r"<principle name=\"(?P<name>[^\"]+)\">")
_RESPONSE = re.compile(r"<response>\n(?P<response>.*)\n</response>", re.DOTALL)
_PROMPT = re.compile(r"<user_message>\n(?P<prompt>.*?)\n</user_message>", re.DOTALL)
#: the valid answers, for engines that decode under a structured-output constraint
SCORE_CHOICES = tuple(str(score) for score in range(SCORE_MIN, SCORE_MAX + 1))
#: the answer budget of a forced answer: the number and little else
FORCED_ANSWER_TOKENS = 8
_SCORE = re.compile(r"^\D*?\b(10|[1-9])\b\D*$")


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


def judge_messages(principle: Principle, prompt: str, response: str) -> tuple[Message, ...]:
    user = (
        f"<principle name=\"{principle.id}\">\n{principle.name}: {principle.description}\n"
        f"Rubric:\n{principle.rubric.strip()}\n</principle>\n\n"
        f"<user_message>\n{prompt}\n</user_message>\n\n<response>\n{response}\n</response>\n\n"
        f"How strongly does the response exhibit the principle? Your rating ({SCORE_MIN}-{SCORE_MAX}):"
    )
    return (Message("system", JUDGE_SYSTEM), Message("user", user))


def parse_judge_messages(messages: Sequence[Message]) -> tuple[str, str, str] | None:
    """(principle id, user prompt, response) from a judge prompt; how a simulated judge reads it."""
    text = "\n".join(m.content for m in messages if m.role == "user")
    principle, prompt, response = _PRINCIPLE.search(text), _PROMPT.search(text), _RESPONSE.search(text)
    if not (principle and prompt and response):
        return None
    return principle.group("name"), prompt.group("prompt"), response.group("response")


#: where a reasoning model's answer starts: gpt-oss through offline vLLM ("analysis…assistantfinal7"),
#: Qwen- and DeepSeek-style models ("<think>…</think>7")
_ANSWER_MARKERS = ("assistantfinal", "</think>")
_REASONING_OPENERS = ("<think>", "analysis")


def split_reasoning(text: str) -> tuple[str, bool]:
    """(the answer after any reasoning, whether the text stopped inside unfinished reasoning)."""
    for marker in _ANSWER_MARKERS:
        if marker in text:
            return text.rsplit(marker, 1)[1], False
    stripped = text.lstrip()
    return text, stripped.startswith(_REASONING_OPENERS)


def forced_answer_messages(messages: Sequence[Message], reasoning: str) -> tuple[Message, ...]:
    """When the answer budget ran out inside the reasoning: close it and ask for the rating alone,
    as the APM authors do (they append the end of reasoning and "Rating:" to the raw prompt; a chat
    backend gets the same as a closed assistant turn and a one-line request)."""
    closed = reasoning.rstrip() + ("\n</think>" if "<think>" in reasoning else "")
    return (*messages, Message("assistant", closed),
            Message("user", f"Stop reasoning. Rating ({SCORE_MIN}-{SCORE_MAX}), the number only:"))


def parse_score(text: str) -> int | None:
    """Strict: the answer's last line must hold exactly one integer in 1..10 and no other digits.
    Reasoning before the answer (`<think>…</think>`, `analysis…assistantfinal`) is not read."""
    text, _ = split_reasoning(text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _SCORE.match(lines[-1].strip())
    return int(match.group(1)) if match else None


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
        self.choices = SCORE_CHOICES if self._constrains(backend) else None
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
            messages=judge_messages(self._principles[rating.principle], rating.prompt, rating.response),
            seed=judge_seed(rating, attempt),
            params=SamplingParams(
                temperature=self.config.temperature,
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
        follow_ups = [
            dataclasses.replace(request, messages=forced_answer_messages(request.messages, generation.text),
                                params=dataclasses.replace(request.params, max_tokens=FORCED_ANSWER_TOKENS,
                                                           reasoning_effort=None, choices=SCORE_CHOICES
                                                           if self.backend.capabilities.structured_outputs else None))
            for _, request, generation in cut
        ]
        for (index, _, _), generation in zip(cut, self.backend.generate(follow_ups)):
            scores[index] = self._read(generation)
            last_answer[index] = generation.text
        self.forced_answers += len(cut)

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
        score = parse_score(generation.text)
        return None if score is None else float(score)

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
