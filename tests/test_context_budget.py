"""The context budget: every request fits the engine's context or is a counted failure, and methods
that put histories or examples into the prompt trim them the same way (oldest / least similar first)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from apm_bench.backends.base import Generation, GenerationRequest, SamplingParams, chat, within_context
from apm_bench.judging.judge import RatingRequest
from apm_bench.judging.llm_judge import LLMJudge
from apm_bench.methods.base import UserView
from apm_bench.methods.context_budget import ContextBudget
from apm_bench.methods.simple import HistoryInContext
from apm_bench.reporting.report import render_report
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from apm_bench.world.catalog import load_catalog

sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import build_tiny_model  # noqa: E402

WINDOW = 400
#: so short that the oracle's long style instructions do not fit at all
TINY_WINDOW = 200


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("short-context"), max_position_embeddings=WINDOW)


@pytest.fixture(scope="module")
def tiny_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-context"), max_position_embeddings=TINY_WINDOW)


@pytest.fixture(scope="module")
def hf(short_context_model: Path):  # type: ignore[no-untyped-def]
    from apm_bench.backends.hf import HFBackend

    return HFBackend(str(short_context_model), batch_size=4)


def _request(text: str, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(chat(text), seed=1, params=SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_requests_are_cut_to_the_room_left_or_fail_without_being_sent() -> None:
    requests = [_request("a", 10), _request("b", 10), _request("c", 10)]
    fitted = within_context(requests, [50, 95, 100], window=100)
    assert fitted[0] is requests[0]  # 50 + 10 fits as asked
    assert isinstance(fitted[1], GenerationRequest) and fitted[1].params.max_tokens == 5
    assert isinstance(fitted[2], Generation) and fitted[2].failed and "100-token context" in (fitted[2].error or "")
    assert within_context(requests, [10**6] * 3, window=None) == requests  # no known limit: nothing to check


def test_hf_answers_what_fits_and_counts_what_does_not(hf) -> None:  # type: ignore[no-untyped-def]
    assert hf.context_window() == WINDOW
    short = _request("hello there", max_tokens=WINDOW)  # the answer budget alone exceeds the context
    long = _request(" ".join(["word"] * WINDOW))
    used = hf.prompt_tokens(short)
    assert hf.prompt_tokens(long) > WINDOW
    answers = hf.generate([long, short, long])
    assert answers[0].failed and answers[2].failed and answers[0].text == ""
    assert not answers[1].failed and answers[1].completion_tokens <= WINDOW - used


def test_history_is_trimmed_oldest_first_to_fit(hf) -> None:  # type: ignore[no-untyped-def]
    budget = ContextBudget(hf, answer_tokens=16)
    history = tuple(f"message {i}: " + " ".join(["alpha"] * 12) for i in range(10))
    method = HistoryInContext()
    method._budget = budget  # as fit() sets it from the run's context
    personalization = method.personalize(UserView("u", history), "What is a prime number?")
    dropped = int(personalization.notes["context_trimmed"])
    assert 0 < dropped < len(history)
    system = personalization.messages[0].content
    assert history[-1] in system and history[dropped] in system and history[dropped - 1] not in system
    request = GenerationRequest(personalization.messages, seed=0)
    assert hf.prompt_tokens(request) + 16 <= WINDOW
    # one message more would not have fitted
    wider = HistoryInContext()
    wider._budget = ContextBudget(hf, answer_tokens=16)
    assert not wider._budget.fits(chat("What is a prime number?", system=system + "\n\n<prompt>" + history[dropped - 1] + "</prompt>"))


def test_without_a_known_window_nothing_is_trimmed() -> None:
    history = tuple(["x " * 5000])
    personalization = HistoryInContext().personalize(UserView("u", history), "hi")
    assert "context_trimmed" not in personalization.notes and history[0] in personalization.messages[0].content


class _Refusing:
    """An engine whose context the judge's prompt never fits."""

    name, model = "refusing", "refusing"
    from apm_bench.backends.base import Capabilities

    capabilities = Capabilities()

    def __init__(self) -> None:
        self.calls = 0

    def fingerprint(self) -> str:
        return "refusing"

    def generate(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        return [Generation(text="", error="context: too long") for _ in requests]


def test_a_judge_prompt_that_does_not_fit_fails_once_with_its_reason() -> None:
    catalog = load_catalog().default_pool()
    engine = _Refusing()
    judge = LLMJudge(engine, list(catalog.principles))  # type: ignore[arg-type]
    ratings = judge.rate([RatingRequest("p", "r", catalog.principles[0].id)])
    assert ratings[0].failed and ratings[0].error == "context: too long"
    assert engine.calls == 1  # no retries: the same prompt would not fit the next time either


def test_a_run_on_a_short_context_trims_counts_and_finishes(tiny_context_model: Path, tmp_path: Path) -> None:
    config = RunConfig(methods=["history", "rag"], model=str(tiny_context_model), backend="hf", users=40,
                       worlds=[0], history_len=6, max_tokens=8, allow_simulated_roles=True,
                       cache=tmp_path / "calls.sqlite", out=tmp_path / "runs")
    result = run_benchmark(config)
    samples = result.samples
    history_rows = samples[samples["method"] == "history"]
    assert (history_rows["context_trimmed"] > 0).all()  # six messages never fit 200 tokens
    # the oracle's long style instructions do not fit at all: counted, not judged, not scored
    failed = samples[samples["generation_error"].notna()]
    assert len(failed) > 0 and failed["reward"].isna().all() and (failed["failed_ratings"] == 0).all()
    pooled = {m.method: m for m in result.metrics if m.world == "pooled"}
    assert pooled["history"].trimmed_prompts == len(history_rows)
    assert sum(m.failed_generations for m in pooled.values()) == int(
        samples[samples["method"] != "baseline"]["generation_error"].notna().sum())
    report = render_report(result, "run", 1.0)
    assert "## Context budget" in report and "| history |" in report.split("## Context budget")[1]
