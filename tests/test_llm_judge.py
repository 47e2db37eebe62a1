"""The LLM judge's prompt, strict parsing, retries, probability weighting; the LLM history writer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from apm_bench.backends.base import Backend, Capabilities, Generation, GenerationRequest
from apm_bench.backends.history_writer import LLMHistoryWriter
from apm_bench.judging.judge import RatingRequest
from apm_bench.judging.llm_judge import (
    LLMJudge,
    LLMJudgeConfig,
    expected_score,
    judge_messages,
    parse_judge_messages,
    parse_score,
)
from apm_bench.world.catalog import Catalog
from apm_bench.world.users import AttributeSetting


class ScriptedBackend(Backend):
    """Answers from a script, one answer per call in order, and records every request."""

    name = "scripted"
    model = "scripted"
    capabilities = Capabilities(logprobs=True)

    def __init__(self, answers: Sequence[Generation]) -> None:
        self.answers = list(answers)
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.requests += requests
        return [self.answers.pop(0) for _ in requests]


@pytest.mark.parametrize("text,score", [("7", 7), ("10", 10), (" 3 \n", 3), ("Rating: 8", 8), ("I think...\n9", 9)])
def test_scores_are_parsed_strictly(text: str, score: int) -> None:
    assert parse_score(text) == score


@pytest.mark.parametrize("text", ["", "seven", "11", "0", "7 or 8", "7/10", "3.5", "score 7, maybe 6"])
def test_ambiguous_or_out_of_range_answers_are_failures(text: str) -> None:
    assert parse_score(text) is None


def test_judge_prompt_shares_its_prefix_and_can_be_read_back(catalog: Catalog) -> None:
    gentle, casual = catalog.principle("gentle"), catalog.principle("casual")
    first = judge_messages(gentle, "How do I fix a bike chain?", "Like this.")
    second = judge_messages(gentle, "What is rust?", "Oxidised iron.")
    other = judge_messages(casual, "What is rust?", "Oxidised iron.")
    assert first[0] == second[0] == other[0]  # one system prompt for every rating
    shared = len(_common_prefix(first[1].content, second[1].content))
    assert shared > len(gentle.rubric)  # the rubric block precedes the per-response part
    assert parse_judge_messages(second) == ("gentle", "What is rust?", "Oxidised iron.")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_expected_score_from_logprobs() -> None:
    single = [{"7": math.log(0.5), "8": math.log(0.25), "10": math.log(0.25)}]
    assert expected_score(single) == pytest.approx(0.5 * 7 + 0.25 * 8 + 0.25 * 10)
    # "10" as two tokens: P(10) = P("1")·P("0"|"1") from the distribution after a "1"; the rest of
    # P("1") is the score 1. The second sampled position follows whatever was sampled first, so it
    # is not that distribution unless the first token was "1".
    first = {"1": math.log(0.4), "9": math.log(0.6)}
    after_one = {"0": math.log(0.75), "<eos>": math.log(0.25)}
    assert expected_score([first], after_one) == pytest.approx(0.4 * 0.75 * 10 + 0.4 * 0.25 * 1 + 0.6 * 9)
    assert expected_score([first], {"0": 0.0}) == pytest.approx(9.40)  # the case: 9.40, not 5.82
    assert expected_score([{"hello": 0.0}]) is None


def test_the_weighted_judge_reads_p10_after_a_forced_one(catalog: Catalog) -> None:
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig

    first = {"1": math.log(0.4), "9": math.log(0.6)}
    sampled_nine = Generation("9", top_logprobs=(first, {"<eos>": 0.0}))
    sampled_one = Generation("10", top_logprobs=(first, {"0": math.log(0.5), "<eos>": math.log(0.5)}))
    backend = ScriptedBackend([sampled_nine, sampled_one, Generation("0", top_logprobs=({"0": 0.0},))])
    judge = LLMJudge(backend, list(catalog.principles), LLMJudgeConfig(weighted=True))
    principle = catalog.principles[0].id
    ratings = judge.rate([RatingRequest(prompt="p", response="r", principle=principle, seed=s) for s in (0, 1)])
    assert ratings[0].score == pytest.approx(9.40)  # P(10) from one token after a forced "1"
    assert ratings[1].score == pytest.approx(0.6 * 9 + 0.2 * 10 + 0.2 * 1)  # sampled "1": its own next position
    forced = backend.requests[2]
    assert forced.prefill == "1" and forced.params.max_tokens == 1 and len(backend.requests) == 3


def test_unparseable_answers_are_retried_then_counted_as_failures(catalog: Catalog) -> None:
    # call 1: r1, r2 both unparseable; call 2: r1 → 8, r2 still not; calls 3 and 4: r2 alone, never parseable.
    backend = ScriptedBackend([Generation("hmm"), Generation("no idea"), Generation("8"), Generation("still no"),
                               Generation("nope"), Generation("nah")])
    judge = LLMJudge(backend, catalog.principles, LLMJudgeConfig(retries=3))
    ratings = judge.rate([RatingRequest("p", "r1", "gentle"), RatingRequest("p", "r2", "casual")])
    assert ratings[0].score == 8.0 and not ratings[0].failed
    assert not backend.answers  # exactly 1 + 3 retries for r2, 2 asks for r1
    by_response = {r.messages[-1].content.split("<response>\n")[1].split("\n</response>")[0] for r in backend.requests}
    assert by_response == {"r1", "r2"}
    assert ratings[1].failed and "unparseable" in (ratings[1].error or "")
    seeds = [r.seed for r in backend.requests if "r2" in r.messages[-1].content]
    assert len(seeds) == 4 and len(set(seeds)) == 4  # each retry asks with another seed


def test_weighted_judge_reads_the_distribution(catalog: Catalog) -> None:
    answer = Generation("6", top_logprobs=({"6": math.log(0.5), "7": math.log(0.5)},))
    backend = ScriptedBackend([answer])
    rating = LLMJudge(backend, catalog.principles, LLMJudgeConfig(weighted=True)).rate([RatingRequest("p", "r", "gentle")])
    assert rating[0].score == pytest.approx(6.5)
    assert backend.requests[0].params.logprobs and backend.requests[0].params.top_logprobs == 20


def test_llm_history_writer_asks_for_attributes_never_for_answer_style(catalog: Catalog) -> None:
    backend = ScriptedBackend([Generation("rewritten one"), Generation("rewritten two"), Generation("rewritten one")])
    writer = LLMHistoryWriter(backend, catalog)
    settings = [AttributeSetting(attribute="anxious", side="follow"), AttributeSetting(attribute="verbose", side="avoid")]
    texts = writer.rewrite(["How do I boil an egg?", "What is a prime number?"], settings, None, np.random.default_rng(3))
    assert texts == ["rewritten one", "rewritten two"] and writer.failed_rewrites == 0
    prompt = backend.requests[0].messages[-1].content
    assert "VERY anxious" in prompt and "NOT AT ALL verbose" in prompt and "How do I boil an egg?" in prompt
    assert "Never add anything about how the answer should be written" in backend.requests[0].messages[0].content
    for principle in catalog.principles:
        assert principle.follow_instruction not in prompt and f"FOLLOW {principle.name}" not in prompt
    again = LLMHistoryWriter(ScriptedBackend([Generation("a")]), catalog)
    again.rewrite(["How do I boil an egg?"], settings, None, np.random.default_rng(3))
    assert again.backend.requests[0].seed == backend.requests[0].seed  # same data seed → same requests


def test_the_judge_asks_for_a_score_choice_only_where_the_engine_can_constrain(catalog) -> None:  # type: ignore[no-untyped-def]
    from apm_bench.backends.base import Capabilities
    from apm_bench.judging.llm_judge import SCORE_CHOICES, LLMJudge, LLMJudgeConfig

    class Engine(ScriptedBackend):
        capabilities = Capabilities(logprobs=True, structured_outputs=True)

    principles = list(catalog.principles)
    request = RatingRequest(prompt="p", response="r", principle=principles[0].id, seed=0)
    assert LLMJudge(Engine([]), principles)._request(request, 0).params.choices == SCORE_CHOICES
    assert LLMJudge(ScriptedBackend([]), principles)._request(request, 0).params.choices is None
    for config in (LLMJudgeConfig(constrained=False), LLMJudgeConfig(reasoning_effort="low"), LLMJudgeConfig(weighted=True)):
        assert LLMJudge(Engine([]), principles, config)._request(request, 0).params.choices is None


@pytest.mark.parametrize("text,score", [
    ("analysis The response is warm and careful, so high.assistantfinal8", 8),  # gpt-oss through offline vLLM
    ("<think>\nIt hedges twice; 3 or 4 would be too low.\n</think>\n\n7", 7),  # Qwen / DeepSeek style
    ("<think>a 2 and a 9</think>10", 10),
])
def test_reasoning_is_not_read_as_the_answer(text: str, score: int) -> None:
    assert parse_score(text) == score


def test_an_answer_cut_off_inside_its_reasoning_is_forced_once(catalog: Catalog) -> None:
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig

    cut = Generation("<think>\nThe response lists three options and then", completion_tokens=64)
    backend = ScriptedBackend([cut, Generation("9"), Generation("6")])
    judge = LLMJudge(backend, list(catalog.principles), LLMJudgeConfig(retries=0, max_tokens=64))
    principle = catalog.principles[0].id
    ratings = judge.rate([RatingRequest(prompt="p", response="r", principle=principle, seed=0),
                          RatingRequest(prompt="q", response="s", principle=principle, seed=1)])
    assert [r.score for r in ratings] == [6.0, 9.0] and judge.forced_answers == 1
    forced = backend.requests[2]
    assert forced.messages[:2] == backend.requests[0].messages
    assert forced.messages[-2].role == "assistant" and forced.messages[-2].content.endswith("</think>")
    assert forced.messages[-1].role == "user" and "number only" in forced.messages[-1].content
    assert forced.params.max_tokens == 8 and len(backend.requests) == 3
