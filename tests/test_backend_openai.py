"""The `openai` backend against `apm serve-sim` on a loopback port, and its retry policy.

The simulator server runs in a subprocess (started once per module, stopped by its own pid); the
retry tests use tiny FastAPI apps served by uvicorn in a thread of this process. Nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from apm_bench.backends import load_backend
from apm_bench.backends.base import AdapterRef, GenerationRequest, Message, SamplingParams, SoftPrompt, chat
from apm_bench.backends.openai_compat import OpenAIBackend, RemoteCallError, unwire_seed, wire_seed
from apm_bench.errors import ConfigError
from apm_bench.judging.judge import RatingRequest
from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig, judge_messages, judge_seed
from apm_bench.judging.sim_judge import SimJudge, SimJudgeConfig
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompting import style_instruction

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 40.0
JUDGE_CONFIG = SimJudgeConfig(noise=1.0, bias=0.4, principle_bias={"casual": -0.7})
PROMPTS = [
    "How do I keep homemade bread from going stale so quickly?",
    "What should I pack for a three-day hike in the mountains?",
    "Can you explain how compound interest works?",
    "My tomato plants have yellow leaves. What is wrong with them?",
    "Is it worth learning Rust if I already know Python?",
]
SERVER_CODE = """
import sys, uvicorn
from apm_bench.world.catalog import load_catalog
from apm_bench.serve import create_app
from apm_bench.judging.sim_judge import SimJudgeConfig
app = create_app(load_catalog().default_pool(), SimJudgeConfig.model_validate_json(sys.argv[2]))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-sim") / "server.log"
    log = log_path.open("wb")  # a file, not a pipe: a chatty server can never block on a full pipe
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(port), JUDGE_CONFIG.model_dump_json()],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                output = log_path.read_text(errors="replace")
                pytest.fail(f"serve-sim exited with {process.returncode}:\n{output[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve-sim did not answer on {url} within {STARTUP_S:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def varied_requests(catalog: Catalog, count: int = 20) -> list[GenerationRequest]:
    principles = catalog.principles
    requests = []
    for i in range(count):
        prompt = PROMPTS[i % len(PROMPTS)]
        principle = principles[(3 * i) % len(principles)]
        side = "follow" if i % 2 == 0 else "avoid"
        system = None if i % 5 == 4 else style_instruction(principle, side)
        requests.append(
            GenerationRequest(
                messages=chat(prompt, system),
                seed=stable_seed("openai-test", i) if i % 3 == 0 else i,  # full 64-bit seeds too
                params=SamplingParams(
                    temperature=(0.7, 1.0, 1.3)[i % 3],
                    max_tokens=256,
                    logprobs=i % 2 == 0,
                    top_logprobs=5 if i % 4 == 0 else 0,
                ),
            )
        )
    return requests


# ---------------------------------------------------------------------------- against serve-sim


def test_models_are_listed(sim_url: str) -> None:
    client = openai.OpenAI(base_url=sim_url, api_key="EMPTY", max_retries=0)
    names = {model.id for model in client.models.list()}
    assert {"sim-small", "sim-large", "sim-judge"} <= names


def test_http_generations_equal_in_process_ones(sim_url: str, catalog: Catalog) -> None:
    requests = varied_requests(catalog)
    remote = OpenAIBackend("sim-large", base_url=sim_url, max_concurrency=4).generate(requests)
    local = load_backend("sim-large", catalog).generate(requests)
    assert len(remote) == len(local) == len(requests)
    assert len({g.text for g in local}) > 15  # the requests really differ
    for request, r, l in zip(requests, remote, local):
        assert r.text == l.text
        assert r.completion_tokens == l.completion_tokens == len(l.text.split())
        assert r.prompt_tokens == l.prompt_tokens
        if request.params.logprobs:
            assert r.logprob is not None and l.logprob is not None
            assert r.logprob == pytest.approx(l.logprob, abs=1e-5)
        else:
            assert r.logprob is None
        if request.params.top_logprobs:
            assert r.top_logprobs is not None and len(r.top_logprobs) == 1
            assert r.top_logprobs[0] == pytest.approx({l.text: l.logprob}, abs=1e-5)
    # sim-small is a different model: same requests, other texts
    small = OpenAIBackend("sim-small", base_url=sim_url).generate(requests[:6])
    assert [g.text for g in small] == [g.text for g in load_backend("sim-small", catalog).generate(requests[:6])]


def test_the_backend_factory_builds_the_http_backend(sim_url: str, catalog: Catalog) -> None:
    backend = load_backend("sim-large", catalog, backend="openai", options={"base_url": sim_url, "max_retries": 1})
    assert isinstance(backend, OpenAIBackend) and backend.model == "sim-large"
    request = varied_requests(catalog, 1)
    assert backend.generate(request)[0].text == load_backend("sim-large", catalog).generate(request)[0].text
    with pytest.raises(ConfigError, match="unknown option"):
        load_backend("sim-large", catalog, backend="openai", options={"base_url": sim_url, "max_conccurency": 2})


def rating_requests(catalog: Catalog, count: int = 30) -> list[RatingRequest]:
    generator = load_backend("sim-large", catalog)
    generations = generator.generate(varied_requests(catalog, count))
    return [
        RatingRequest(PROMPTS[i % len(PROMPTS)], g.text, catalog.principle_ids[(7 * i) % len(catalog.principles)], seed=i)
        for i, g in enumerate(generations)
    ]


def test_judge_over_http_equals_the_simulated_judge(sim_url: str, catalog: Catalog) -> None:
    ratings = rating_requests(catalog)
    backend = OpenAIBackend("sim-judge", base_url=sim_url)

    plain = LLMJudge(backend, catalog.principles).rate(ratings)
    # LLMJudge asks with the rating's own seed (judge_seed); the served SimJudge rates with it
    as_served = [RatingRequest(r.prompt, r.response, r.principle, seed=judge_seed(r, 0)) for r in ratings]
    expected = SimJudge(catalog.principles, JUDGE_CONFIG).rate(as_served)
    assert [r.score for r in plain] == [r.score for r in expected]
    assert all(r.score is not None for r in plain)
    assert len({r.score for r in plain}) >= 4

    weighted = LLMJudge(backend, catalog.principles, LLMJudgeConfig(weighted=True)).rate(ratings)
    reference = SimJudge(catalog.principles, JUDGE_CONFIG.model_copy(update={"weighted": True})).rate(ratings)
    for got, want in zip(weighted, reference):
        assert got.score is not None and want.score is not None
        assert abs(got.score - want.score) < 1e-6
    assert any(r.score != round(r.score) for r in weighted if r.score is not None)


def test_server_errors_are_openai_shaped(sim_url: str, catalog: Catalog) -> None:
    client = openai.OpenAI(base_url=sim_url, api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="sim-huge", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sim-judge", messages=[{"role": "user", "content": "rate this"}])
    # the backend reports the 400 as an error at once, never as an empty answer
    judge = OpenAIBackend("sim-judge", base_url=sim_url)
    with pytest.raises(RemoteCallError, match="HTTP 400"):
        judge.generate([GenerationRequest(chat("rate this"), seed=0)])
    # a judge prompt for a principle the server does not know is refused too
    principle = catalog.principles[0].model_copy(update={"id": "no_such_principle"})
    with pytest.raises(RemoteCallError, match="unknown principle"):
        judge.generate([GenerationRequest(judge_messages(principle, "p", "r"), seed=0)])


def test_judge_failures_come_back_unparseable(catalog: Catalog) -> None:
    """With failure_rate=1 every served answer is a non-score, which the LLM judge reports as failed."""
    from apm_bench.serve import create_app

    app = create_app(catalog, SimJudgeConfig(failure_rate=1.0))
    with served(app) as url:
        ratings = LLMJudge(OpenAIBackend("sim-judge", base_url=url), catalog.principles, LLMJudgeConfig(retries=1))
        result = ratings.rate(rating_requests(catalog, 3))
    assert all(r.failed and "unparseable" in (r.error or "") for r in result)


# ---------------------------------------------------------------------------- retries, in-thread servers


class served:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port, as a context manager."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.config.port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def completion(model: str, content: str | None) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[str, Counter, dict[str, dict]]]:
    """Per model: 'flaky' fails twice with 503 then answers, 'down' always 503, 'bad' always 400,
    'empty' answers with no content; every call is counted by model and the last body kept."""
    calls: Counter = Counter()
    bodies: dict[str, dict] = {}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def answer(request: Request) -> JSONResponse:
        body = await request.json()
        model = body["model"]
        calls[model] += 1
        bodies[model] = body
        if model == "down" or (model == "flaky" and calls[model] <= 2):
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        if model == "bad":
            return JSONResponse({"error": {"message": "no such thing", "type": "invalid_request_error"}}, status_code=400)
        if model == "limited" and calls[model] == 1:
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429)
        return JSONResponse(completion(model, None if model == "empty" else "fine"))

    with served(app) as url:
        yield url, calls, bodies


def fast_backend(model: str, url: str, **options: object) -> OpenAIBackend:
    backend = OpenAIBackend(model, base_url=url, **options)  # type: ignore[arg-type]
    backend.retry_base_delay = 0.01
    return backend


def test_retries_on_503_then_succeeds(flaky: tuple[str, Counter, dict[str, dict]]) -> None:
    url, calls, _ = flaky
    result = fast_backend("flaky", url).generate([GenerationRequest(chat("hello"), seed=1)])
    assert result[0].text == "fine"
    assert result[0].prompt_tokens == 3 and result[0].completion_tokens == 1
    assert calls["flaky"] == 3
    fast_backend("limited", url).generate([GenerationRequest(chat("hello"), seed=1)])
    assert calls["limited"] == 2


def test_client_errors_fail_at_once_and_exhausted_retries_raise(flaky: tuple[str, Counter, dict[str, dict]]) -> None:
    url, calls, _ = flaky
    start = time.monotonic()
    with pytest.raises(RemoteCallError, match="HTTP 400"):
        OpenAIBackend("bad", base_url=url).generate([GenerationRequest(chat("hello"), seed=1)])  # default backoff
    assert time.monotonic() - start < 2.0
    assert calls["bad"] == 1
    with pytest.raises(RemoteCallError, match="3 time"):
        fast_backend("down", url, max_retries=2).generate([GenerationRequest(chat("hello"), seed=1)])
    assert calls["down"] == 3


def test_empty_content_is_an_empty_text(flaky: tuple[str, Counter, dict[str, dict]]) -> None:
    url, _, _ = flaky
    assert fast_backend("empty", url).generate([GenerationRequest(chat("hello"), seed=1)])[0].text == ""


def test_request_shape(flaky: tuple[str, Counter, dict[str, dict]]) -> None:
    url, _, bodies = flaky
    backend = fast_backend("base-model", url, chat_template_kwargs={"enable_thinking": False}, extra_body={"top_k": 20})
    seed = 2**64 - 5
    request = GenerationRequest(
        (Message("system", "s"), Message("user", "u")),
        seed=seed,
        params=SamplingParams(temperature=0.3, top_p=0.9, max_tokens=7, logprobs=True, top_logprobs=3, reasoning_effort="low"),
        adapter=AdapterRef("user-17"),
    )
    backend.generate([request])
    body = bodies["user-17"]
    assert body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 7)
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and body["reasoning_effort"] == "low"
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["top_k"] == 20
    assert -(2**63) <= body["seed"] < 2**63 and unwire_seed(body["seed"]) == seed
    assert wire_seed(12) == 12


def test_generate_works_inside_a_running_event_loop(flaky: tuple[str, Counter, dict[str, dict]]) -> None:
    import asyncio

    url, _, _ = flaky

    async def caller() -> str:
        return fast_backend("ok", url).generate([GenerationRequest(chat("hello"), seed=1)])[0].text

    assert asyncio.run(caller()) == "fine"


# ---------------------------------------------------------------------------- configuration errors


def test_keys_come_only_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIBackend("gpt-4o", base_url="https://api.example.com/v1")
    with pytest.raises(ConfigError, match="MY_PROVIDER_KEY"):
        OpenAIBackend("gpt-4o", base_url="https://api.example.com/v1", api_key_env="MY_PROVIDER_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIBackend("gpt-4o")  # no URL: the hosted API
    OpenAIBackend("local", base_url="http://127.0.0.1:8000/v1")  # a local server needs no key
    OpenAIBackend("local", base_url="http://localhost:8000/v1")
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-test-secret")
    backend = OpenAIBackend("gpt-4o", base_url="https://api.example.com/v1", api_key_env="MY_PROVIDER_KEY")
    assert "sk-test-secret" not in repr(backend) and "sk-test-secret" not in backend.fingerprint() and "sk-test-secret" not in json.dumps(vars(backend), default=str)


def test_soft_prompts_and_unknown_options_are_refused() -> None:
    backend = OpenAIBackend("local", base_url="http://127.0.0.1:9/v1")
    soft = GenerationRequest(chat("hi"), seed=0, soft_prompt=SoftPrompt(np.zeros((2, 4), dtype=np.float32)))
    with pytest.raises(ConfigError, match="soft prompt"):
        backend.generate([soft])
    assert not backend.capabilities.soft_prompts and backend.capabilities.adapters and backend.capabilities.logprobs
    with pytest.raises(ConfigError, match="unknown option"):
        OpenAIBackend("local", base_url="http://127.0.0.1:9/v1", temperature=0.5)
    with pytest.raises(ConfigError):
        OpenAIBackend("local", base_url="http://127.0.0.1:9/v1", max_concurrency=0)


def test_an_unreachable_server_raises_after_retries() -> None:
    backend = fast_backend("local", f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    with pytest.raises(RemoteCallError, match="2 time"):
        backend.generate([GenerationRequest(chat("hi"), seed=0)])


def test_a_prefilled_answer_is_sent_as_a_final_assistant_message_to_continue() -> None:
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", api_key_env="PATH")
    kwargs = backend.request_kwargs(GenerationRequest(chat("rate this"), seed=0, prefill="1"))
    assert kwargs["messages"][-1] == {"role": "assistant", "content": "1"}
    assert kwargs["extra_body"]["continue_final_message"] is True and kwargs["extra_body"]["add_generation_prompt"] is False
    plain = backend.request_kwargs(GenerationRequest(chat("rate this"), seed=0))
    assert plain["messages"][-1]["role"] == "user" and "continue_final_message" not in plain.get("extra_body", {})


def test_structured_outputs_are_sent_to_servers_that_take_them() -> None:
    constrained = SamplingParams(max_tokens=2, choices=("1", "2", "10"))
    plain_server = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", api_key_env="PATH")
    assert not plain_server.capabilities.structured_outputs  # an unknown server is not sent vLLM's field
    assert "structured_outputs" not in plain_server.request_kwargs(
        GenerationRequest(chat("rate"), seed=0, params=constrained)).get("extra_body", {})
    vllm_server = OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", api_key_env="PATH", structured_outputs=True)
    assert vllm_server.capabilities.structured_outputs and not OpenAIBackend.capabilities.structured_outputs
    body = vllm_server.request_kwargs(GenerationRequest(chat("rate"), seed=0, params=constrained))["extra_body"]
    assert body["structured_outputs"] == {"choice": ["1", "2", "10"]}
    judge = LLMJudge(vllm_server, [], LLMJudgeConfig())
    assert judge.choices is not None and "10" in judge.choices
    with pytest.raises(ConfigError, match="structured_outputs"):
        OpenAIBackend("m", base_url="http://127.0.0.1:1/v1", api_key_env="PATH", structured_outputs="yes")
