"""`apm serve-sim`: the simulator behind an OpenAI-compatible HTTP API.

It lets the `openai` backend (and any other OpenAI client) be tested end to end without a GPU:

- `sim-small`, `sim-large`: the same SimBackend that runs in-process, so a request sent over HTTP
  gives the same text as the same GenerationRequest in-process (same seed, same messages).
- `sim-judge`: reads the LLM judge's prompt (`apm_bench.judging.llm_judge.judge_messages`) back into
  (principle, prompt, response), rates it with SimJudge and answers the score as text, e.g. "7".
  With logprobs it also returns the score distribution over the tokens "1".."10".

Log-probabilities: a simulated response has ONE log-probability, that of its whole style vector, not
one per token. It is reported as a single `logprobs.content` entry whose token is the whole
response text and whose logprob is that total, so a client summing token logprobs gets it exactly.
Token counts in `usage` are whitespace-separated words.

Seeds: clients send seeds as signed 64-bit integers (see `openai_compat.wire_seed`); a negative
seed is mapped back to the unsigned seed it stands for. No seed means seed 0.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from apm_bench.backends.base import Backend, Generation, GenerationRequest, Message, SamplingParams
from apm_bench.backends.openai_compat import unwire_seed
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIDPOINT, SCORE_MIN, Rating, RatingRequest
from apm_bench.judging.llm_judge import parse_judge_messages
from apm_bench.judging.sim_judge import POINTS_PER_LEVEL, SimJudge, SimJudgeConfig
from apm_bench.sim.style import StyleCodec
from apm_bench.world.catalog import Catalog, Principle
from apm_bench.world.prompting import bare_name

JUDGE_MODEL = "sim-judge"
#: what the simulated judge says when SimJudge's failure_rate strikes: a non-score, so it counts as unparseable
JUDGE_FAILURE_TEXT = "I cannot rate this response."
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------- the judge's distribution


def score_log_probs(mean: float, noise: float) -> dict[int, float]:
    """Log-probabilities of the scores 1..10 under SimJudge's discretised normal.

    The same weights as SimJudge's weighted mode, exp(-(k - mean)² / (2 w²)) with w = max(noise, 0.5),
    normalised (in log space, so that far-off means do not underflow).
    """
    scores = np.arange(SCORE_MIN, SCORE_MAX + 1, dtype=float)
    width = max(noise, 0.5)
    log_weights = -((scores - mean) ** 2) / (2 * width**2)
    peak = log_weights.max()
    log_total = peak + math.log(float(np.exp(log_weights - peak).sum()))
    return {int(k): float(lw - log_total) for k, lw in zip(scores, log_weights)}


class SimJudgeScorer:
    """SimJudge plus the score distribution a logprob-reading client needs.

    The judge's mean score is not public on SimJudge, so it is recomputed here from public pieces
    with SimJudge's formula: 5.5 + 2 · (principle's measured feature) + bias + principle bias.
    """

    def __init__(self, principles: list[Principle], config: SimJudgeConfig | None = None) -> None:
        self.config = config or SimJudgeConfig()
        # the answer text is always a sampled (noisy, rounded) score, as an LLM's would be
        self.judge = SimJudge(principles, self.config.model_copy(update={"weighted": False}))
        self.codec = StyleCodec(principles)
        self.index = {p.id: i for i, p in enumerate(principles)}
        self._ids_by_name = {bare_name(p): p.id for p in principles}

    def knows(self, principle: str) -> bool:
        return principle in self.index

    def principle_id(self, id_or_name: str) -> str:
        """The rubric prompt names a principle by id, the authors' prompt by its bare name."""
        return self._ids_by_name.get(id_or_name, id_or_name)

    def mean_score(self, request: RatingRequest) -> float:
        feature = float(self.codec.measure(request.response)[self.index[request.principle]])
        return (
            SCORE_MIDPOINT
            + POINTS_PER_LEVEL * feature
            + self.config.bias
            + self.config.principle_bias.get(request.principle, 0.0)
        )

    def rate(self, request: RatingRequest) -> Rating:
        return self.judge.rate([request])[0]

    def distribution(self, request: RatingRequest) -> dict[int, float]:
        return score_log_probs(self.mean_score(request), self.config.noise)

    def expected_score(self, request: RatingRequest) -> float:
        return sum(k * math.exp(lp) for k, lp in self.distribution(request).items())


# ---------------------------------------------------------------------------- wire formats


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class _ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (chat_template_kwargs, ...) are ignored

    model: str
    messages: list[_ChatMessage]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int | None = None
    stream: bool | None = None


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _text_of(message: _ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = [part.get("text", "") for part in message.content if part.get("type") == "text"]
    if len(parts) != len(message.content):
        raise _BadRequest("only text content parts are supported", "messages")
    return "".join(parts)


def _messages(body: _ChatRequest) -> tuple[Message, ...]:
    out = []
    for message in body.messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise _BadRequest(f"unsupported message role {message.role!r}", "messages")
        out.append(Message(role, _text_of(message)))  # type: ignore[arg-type]
    return tuple(out)


def _sampling(body: _ChatRequest) -> SamplingParams:
    if body.top_logprobs and not body.logprobs:
        raise _BadRequest("top_logprobs requires logprobs=true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise _BadRequest("top_logprobs must lie in 0..20", "top_logprobs")
    defaults = SamplingParams()
    max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        max_tokens=max_tokens,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
    )


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _completion(model: str, text: str, prompt_tokens: int, completion_tokens: int, logprobs: Any) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _words(messages: tuple[Message, ...]) -> int:
    return sum(len(m.content.split()) for m in messages)


# ---------------------------------------------------------------------------- the app


def sim_model_names() -> list[str]:
    """The simulator aliases of the model table (sim-small, sim-large)."""
    from apm_bench.backends import model_registry

    registry = model_registry()
    return [alias for alias in registry.names() if registry.get(alias).backend == "sim"]


def create_app(catalog: Catalog, judge_config: SimJudgeConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app over the simulator; all state (backends, judge) belongs to this app."""
    from apm_bench.backends import load_backend

    generators: dict[str, Backend] = {alias: load_backend(alias, catalog) for alias in sim_model_names()}
    scorer = SimJudgeScorer(catalog.principles, judge_config)
    app = FastAPI(title="apm-bench simulator (OpenAI-compatible)")
    app.state.generators = generators
    app.state.scorer = scorer

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {error.errors()}", "invalid_request_error")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        names = [*generators, JUDGE_MODEL]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "apm-bench"} for n in names]}

    def generate(model: str, body: _ChatRequest) -> dict[str, Any]:
        request = GenerationRequest(messages=_messages(body), seed=unwire_seed(body.seed or 0), params=_sampling(body))
        generation: Generation = generators[model].generate([request])[0]
        logprobs = None
        if request.params.logprobs and generation.logprob is not None:
            alternatives = [_token(generation.text, generation.logprob)] if request.params.top_logprobs else []
            logprobs = {"content": [{**_token(generation.text, generation.logprob), "top_logprobs": alternatives}]}
        return _completion(model, generation.text, generation.prompt_tokens, generation.completion_tokens, logprobs)

    def judge(body: _ChatRequest) -> dict[str, Any]:
        messages = _messages(body)
        params = _sampling(body)
        parsed = parse_judge_messages(messages)
        if parsed is None:
            raise _BadRequest("not a judge prompt: expected <principle>, <user_message> and <response> blocks "
                              "(or the authors' <conversation>, <ai_response_to_evaluate> and <attribute>)", "messages")
        principle, prompt, response = parsed
        principle = scorer.principle_id(principle)
        if not scorer.knows(principle):
            raise _BadRequest(f"unknown principle {principle!r}", "messages")
        rating_request = RatingRequest(prompt, response, principle, seed=unwire_seed(body.seed or 0))
        rating = scorer.rate(rating_request)
        text = JUDGE_FAILURE_TEXT if rating.score is None else str(int(rating.score))
        logprobs = None
        if params.logprobs:
            if rating.score is None:  # no mass on any score: a logprob reader sees a failure too
                first = text.split()[0]
                entry = {**_token(first, 0.0), "top_logprobs": [_token(first, 0.0)] if params.top_logprobs else []}
            else:
                distribution = scorer.distribution(rating_request)
                ranked = sorted(distribution.items(), key=lambda item: -item[1])[: params.top_logprobs]
                entry = {
                    **_token(text, distribution[int(rating.score)]),
                    "top_logprobs": [_token(str(k), lp) for k, lp in ranked],
                }
            logprobs = {"content": [entry]}
        return _completion(JUDGE_MODEL, text, _words(messages), len(text.split()), logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: _ChatRequest) -> Any:
        if body.model not in generators and body.model != JUDGE_MODEL:
            return _error(
                404, f"The model `{body.model}` does not exist. Known: {', '.join([*generators, JUDGE_MODEL])}",
                "invalid_request_error", code="model_not_found", param="model",
            )
        if body.stream:
            return _error(400, "streaming is not supported by the simulator server", "invalid_request_error", param="stream")
        if body.n not in (None, 1):
            return _error(400, "only n=1 is supported", "invalid_request_error", param="n")
        try:
            return judge(body) if body.model == JUDGE_MODEL else generate(body.model, body)
        except _BadRequest as error:
            return _error(400, error.message, "invalid_request_error", param=error.param)

    return app


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    catalog: Catalog | None = None,
    judge_config: SimJudgeConfig | None = None,
    log_level: str = "info",
) -> None:
    """Serve the simulator until interrupted (blocking); `apm serve-sim` calls this."""
    import uvicorn

    from apm_bench.world.catalog import load_catalog

    app = create_app(catalog or load_catalog().default_pool(), judge_config)  # the pool a default run uses
    uvicorn.run(app, host=host, port=port, log_level=log_level)
