"""Any OpenAI-compatible chat server (`vllm serve`, SGLang, llama.cpp, hosted APIs) as a Backend.

Requests go out concurrently through the official async client, bounded by a semaphore. The
client's own retries are switched off and replaced by ours (exponential backoff with jitter on
429, 5xx, timeouts and dropped connections), so that every failure is counted in one place and
a request that keeps failing raises instead of quietly turning into an empty answer.

The API key is read from the environment, by the variable's name, each time a client is made; it
is never kept on the backend, logged, or written into configs and results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from apm_bench.backends.base import Backend, Capabilities, Generation, GenerationRequest, context_failure
from apm_bench.errors import ApmError, ConfigError

#: the placeholder key local servers accept (vLLM's own documentation uses it)
LOCAL_API_KEY = "EMPTY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
_INT64_MAX = 2**63 - 1
_UINT64 = 2**64

T = TypeVar("T")


class RemoteCallError(ApmError):
    """The server refused a request (4xx other than 429), or kept failing after every retry."""


def is_local_url(url: str | None) -> bool:
    """True for a server on this machine or a private network (no key needed), False for the internet."""
    if not url:
        return False
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified


def wire_seed(seed: int) -> int:
    """The request seed as the signed 64-bit integer servers accept (vLLM rejects seeds ≥ 2**63).

    Seeds from `stable_seed` span the unsigned 64-bit range; they are sent in two's complement, so
    the mapping is one-to-one and a server can undo it (`apm serve-sim` does, see `unwire_seed`).
    """
    seed %= _UINT64
    return seed - _UINT64 if seed > _INT64_MAX else seed


def unwire_seed(seed: int) -> int:
    """Inverse of `wire_seed` for seeds in [-2**63, 2**64)."""
    return seed + _UINT64 if seed < 0 else seed


def is_context_error(error: Exception) -> bool:
    """HTTP 400 because prompt plus answer exceed the model's context (vLLM, OpenAI and SGLang say so)."""
    message = str(getattr(error, "message", "") or error).lower()
    return getattr(error, "status_code", None) == 400 and any(
        phrase in message for phrase in ("context length", "max_model_len", "context window", "too long"))


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # A loop already runs in this thread (a notebook, an async caller): use a private one in a thread.
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name="apm-openai-backend", daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class OpenAIBackend(Backend):
    """Chat completions over HTTP; one request per GenerationRequest, results in request order.

    Adapters are addressed by name: vLLM serves each LoRA adapter as its own model name, so a request
    with `adapter=AdapterRef("user-17")` is sent with `model="user-17"`. Soft prompts cannot travel
    over this API and are refused. `structured_outputs: true` (for vLLM servers) sends a request's
    `choices` as vLLM's `structured_outputs` body field, so the judge's answer is decoded as a score.
    """

    name = "openai"
    capabilities = Capabilities(logprobs=True, adapters=True, soft_prompts=False, trainable=False)

    #: backoff before retry k (0-based) is about retry_base_delay · 2**k seconds, capped, with jitter
    retry_base_delay: float = 0.5
    retry_max_delay: float = 30.0

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        max_retries: int = 5,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retry_budget: float = 60.0,
        chat_template_kwargs: dict[str, Any] | None = None,
        extra_body: dict[str, Any] | None = None,
        max_model_len: int | None = None,
        structured_outputs: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            known = ("base_url, api_key_env, max_concurrency, max_retries, timeout, connect_timeout, retry_budget, "
                     "chat_template_kwargs, "
                     "extra_body, max_model_len, structured_outputs")
            raise ConfigError(f"unknown option(s) for the openai backend: {', '.join(sorted(unknown))}; known: {known}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        for label, seconds in (("timeout", timeout), ("connect_timeout", connect_timeout), ("retry_budget", retry_budget)):
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
                raise ConfigError(f"{label} must be a positive number of seconds, got {seconds!r}")
        if not api_key_env:
            raise ConfigError("api_key_env must name an environment variable")
        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                          or max_model_len < 1):
            raise ConfigError(f"max_model_len must be a positive integer, got {max_model_len!r}")
        if not isinstance(structured_outputs, bool):
            raise ConfigError(f"structured_outputs must be true or false, got {structured_outputs!r}")
        if structured_outputs:
            self.capabilities = dataclasses.replace(self.capabilities, structured_outputs=True)
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retry_budget = float(retry_budget)
        #: retries so far, and since when every attempt has failed (None: the last one succeeded)
        self.retries = 0
        self._failing_since: float | None = None
        self._report: Callable[[str], None] | None = None
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.extra_body = dict(extra_body or {})
        self._window: int | None = max_model_len
        self._window_asked = max_model_len is not None
        self._jitter = random.Random()
        self._api_key()  # fail at construction, not in the middle of a run

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    def fingerprint(self) -> str:
        """Model, server and the body options that change answers; never the key."""
        shaping = {"chat_template_kwargs": self.chat_template_kwargs, "extra_body": self.extra_body}
        return f"{self.name}:{self.model}@{self.effective_base_url}:" + json.dumps(shaping, sort_keys=True, default=str)

    @property
    def effective_base_url(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if is_local_url(self.effective_base_url):
            return LOCAL_API_KEY
        raise ConfigError(
            f"the environment variable {self.api_key_env} is not set; it must hold the API key for "
            f"{self.effective_base_url} (keys are read from the environment only)"
        )

    # ------------------------------------------------------------------ the server's context

    @property
    def server_root(self) -> str:
        """The server without its /v1 (vLLM serves /tokenize beside it, not under it)."""
        url = self.effective_base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A small JSON call to the server; None where it does not offer it (not every server is vLLM).
        The standard library's client: the openai package's own HTTP library changes between majors."""
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.server_root}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self._api_key()}", "Content-Type": "application/json"})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=self.connect_timeout) as response:  # noqa: S310 (the user's server)
                data = json.loads(response.read())
        except (urllib.error.HTTPError, ValueError):
            return None  # the server answered: it does not offer this, or not as JSON
        except (urllib.error.URLError, OSError):
            # not answered at all: the retry budget's clock starts here, not at the first generation
            self._failing_since = self._failing_since or started
            return None
        self._failing_since = None
        return data if isinstance(data, dict) else None

    def context_window(self) -> int | None:
        """`max_model_len` as given, else as the server lists it for the model (vLLM does)."""
        if not self._window_asked:
            self._window_asked = True
            listing = self._http("GET", "/v1/models") or {}
            for entry in listing.get("data") or []:
                if isinstance(entry, dict) and entry.get("id") == self.model and isinstance(entry.get("max_model_len"), int):
                    self._window = entry["max_model_len"]
        return self._window

    def prompt_tokens(self, request: GenerationRequest) -> int:
        """Counted by the server's own tokenizer and chat template (vLLM's /tokenize)."""
        kwargs = self.request_kwargs(request)
        body: dict[str, Any] = {"model": self.model, "messages": kwargs["messages"], **kwargs.get("extra_body", {})}
        body.setdefault("add_generation_prompt", True)
        answer = self._http("POST", "/tokenize", body)
        if answer is None or not isinstance(answer.get("count"), int):
            raise RemoteCallError(f"{self.server_root} does not count tokens (no /tokenize); set the openai "
                                  "option max_model_len only for a vLLM server")
        return int(answer["count"])

    async def _over_context(self, client: Any, request: GenerationRequest, kwargs: dict[str, Any],
                            message: str) -> Generation:
        """A request the server refused as too long: asked once more with the answer budget that
        is left, or, where the prompt alone is too long, a failed generation (the run goes on)."""
        window = await asyncio.to_thread(self.context_window)
        try:
            used = await asyncio.to_thread(self.prompt_tokens, request)
        except RemoteCallError:
            return Generation(text="", error=f"context: {message}")
        if window is None or window - used < 1:
            return context_failure(used, window) if window else Generation(text="", prompt_tokens=used,
                                                                            error=f"context: {message}")
        completion = await client.chat.completions.create(**{**kwargs, "max_tokens": min(kwargs["max_tokens"], window - used)})
        return self.to_generation(completion, request)

    # ------------------------------------------------------------------ requests and responses

    def request_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for one request (no secrets in here)."""
        if request.soft_prompt is not None:
            raise ConfigError("the openai backend cannot send soft prompts over HTTP; use the hf or vllm backend")
        params = request.params
        kwargs: dict[str, Any] = {
            "model": request.adapter.name if request.adapter is not None else self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": wire_seed(request.seed),
        }
        if params.logprobs or params.top_logprobs:
            kwargs["logprobs"] = True
            if params.top_logprobs:
                kwargs["top_logprobs"] = params.top_logprobs
        if params.reasoning_effort:
            kwargs["reasoning_effort"] = params.reasoning_effort
        body = dict(self.extra_body)
        if params.choices and self.capabilities.structured_outputs:
            body["structured_outputs"] = {"choice": list(params.choices)}
        if request.prefill:  # vLLM's server continues a final assistant message on request
            kwargs["messages"].append({"role": "assistant", "content": request.prefill})
            body.update(continue_final_message=True, add_generation_prompt=False)
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = {**body.get("chat_template_kwargs", {}), **self.chat_template_kwargs}
        if body:
            kwargs["extra_body"] = body
        return kwargs

    @staticmethod
    def to_generation(completion: Any, request: GenerationRequest) -> Generation:
        """A chat completion as a Generation; no choice or no content gives the empty text."""
        usage = getattr(completion, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        choices = getattr(completion, "choices", None) or []
        if not choices:
            return Generation(text="", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        choice = choices[0]
        text = (choice.message.content if choice.message is not None else None) or ""
        logprob: float | None = None
        top: tuple[dict[str, float], ...] | None = None
        content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
        if content is not None and (request.params.logprobs or request.params.top_logprobs):
            logprob = float(sum(entry.logprob for entry in content))
            if request.params.top_logprobs:
                positions = []
                for entry in content:
                    alternatives: dict[str, float] = {}
                    for option in entry.top_logprobs or []:
                        alternatives.setdefault(option.token, float(option.logprob))  # keep the likeliest duplicate
                    positions.append(alternatives)
                top = tuple(positions)
        return Generation(
            text=text,
            logprob=logprob,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            top_logprobs=top,
        )

    # ------------------------------------------------------------------ the async machinery

    def _backoff(self, retry: int, error: Exception) -> float:
        ceiling = min(self.retry_max_delay, self.retry_base_delay * 2**retry)
        delay = ceiling / 2 + self._jitter.uniform(0, ceiling / 2)
        response = getattr(error, "response", None)
        retry_after = getattr(response, "headers", {}).get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.retry_max_delay))
            except ValueError:
                pass  # an HTTP date: keep our own delay
        return delay

    @staticmethod
    def _retryable(error: Exception) -> bool:
        import openai

        if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)):
            return True
        if isinstance(error, openai.APIStatusError):
            return error.status_code >= 500 or error.status_code in (408, 429)
        return False

    def set_reporter(self, report: Callable[[str], None]) -> None:
        """Where retries are announced (the run's progress line)."""
        self._report = report

    def _give_up(self, error: Exception, model: str, attempt: int, started: float, delay: float) -> RemoteCallError | None:
        """The error to stop with, or None to retry after `delay`: after the request's last attempt,
        or when every attempt of every request has been failing for so long that the next one would
        end beyond the retry budget. A server that cannot be reached thus fails the run in about
        `retry_budget` seconds, not after each request's full backoff."""
        self._failing_since = self._failing_since or started
        failing = time.monotonic() - self._failing_since
        if attempt > self.max_retries or failing + delay + self.connect_timeout > self.retry_budget:
            why = (f"failed a request for model {model!r} {attempt} time(s)" if attempt > self.max_retries
                   else f"has failed every request for {failing:.0f} s (retry budget {self.retry_budget:.0f} s)")
            return RemoteCallError(f"{self.effective_base_url} {why}; last error: {type(error).__name__}: "
                                   f"{getattr(error, 'message', error)}")
        return None

    async def _generate_one(self, client: Any, semaphore: asyncio.Semaphore, request: GenerationRequest) -> Generation:
        import openai

        kwargs = self.request_kwargs(request)
        for attempt in range(1, self.max_retries + 2):
            async with semaphore:
                started = time.monotonic()
                try:
                    completion = await client.chat.completions.create(**kwargs)
                    self._failing_since = None
                    return self.to_generation(completion, request)
                except openai.APIError as error:
                    if is_context_error(error):
                        return await self._over_context(client, request, kwargs, str(error.message))
                    if not self._retryable(error):
                        status = getattr(error, "status_code", "?")
                        raise RemoteCallError(
                            f"{self.effective_base_url} refused a request for model {kwargs['model']!r} "
                            f"(HTTP {status}): {error.message}"
                        ) from error
                    delay = self._backoff(attempt - 1, error)
                    stop = self._give_up(error, kwargs["model"], attempt, started, delay)
                    if stop is not None:
                        raise stop from error
                    self.retries += 1
                    if self._report is not None:
                        self._report(f"{self.effective_base_url}: {type(error).__name__}, retry {attempt}/"
                                     f"{self.max_retries} in {delay:.1f} s ({self.retries} retries so far)")
            await asyncio.sleep(delay)  # outside the semaphore: a waiting retry holds no slot
        raise AssertionError("unreachable")

    async def _generate_all(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        import openai

        semaphore = asyncio.Semaphore(self.max_concurrency)
        client = openai.AsyncOpenAI(
            base_url=self.effective_base_url, api_key=self._api_key(), max_retries=0,
            timeout=openai.Timeout(self.timeout, connect=self.connect_timeout),
        )
        try:
            tasks = [asyncio.create_task(self._generate_one(client, semaphore, r)) for r in requests]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await client.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        requests = list(requests)
        if not requests:
            return []
        for request in requests:  # refuse before anything is sent
            if request.soft_prompt is not None:
                raise ConfigError("the openai backend cannot send soft prompts over HTTP; use the hf or vllm backend")
        return _run_sync(self._generate_all(requests))
