"""The vllm backend against real vLLM engines: translation, seeds, batch invariance, adapters,
soft prompts, logprobs, and the engine budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import vllm
from conftest import ENGINE

from apm_bench.backends.base import AdapterRef, GenerationRequest, SamplingParams, SoftPrompt, chat
from apm_bench.backends.budget import EngineBudget
from apm_bench.backends.hf import HFBackend
from apm_bench.backends.vllm import VLLMBackend, sampling_kwargs, vllm_platform


def _request(prompt: str, seed: int = 0, adapter: AdapterRef | None = None, soft: SoftPrompt | None = None,
             **params: object) -> GenerationRequest:
    defaults: dict[str, object] = {"temperature": 0.0, "max_tokens": 12}
    return GenerationRequest(chat(prompt), seed=seed, params=SamplingParams(**{**defaults, **params}),
                             adapter=adapter, soft_prompt=soft)


def test_the_platform_is_found_and_its_options_applied(engine: VLLMBackend) -> None:
    assert vllm_platform() == engine.platform == "cpu"
    assert engine.group_by_adapter  # mixed adapter batches are wrong on the CPU build
    assert engine._engine_kwargs["enable_chunked_prefill"] is False


def test_sampling_params_translate_into_real_vllm_sampling_params() -> None:
    request = _request("x", seed=7, temperature=0.7, top_p=0.9, max_tokens=33, top_logprobs=5)
    params = vllm.SamplingParams(**sampling_kwargs(request))
    assert (params.temperature, params.top_p, params.max_tokens, params.seed, params.logprobs) == (0.7, 0.9, 33, 7, 5)
    plain = vllm.SamplingParams(**sampling_kwargs(_request("x", seed=3)))
    assert plain.logprobs is None and plain.seed == 3


def test_seeded_samples_repeat_across_batches(engine: VLLMBackend) -> None:
    requests = [_request(f"Tell me about {word}.", seed=i, temperature=1.0, max_tokens=16)
                for i, word in enumerate(["rivers", "clocks", "bread", "owls"])]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests[::-1]][::-1]
    assert [g.text for g in together] == [g.text for g in alone]
    other_seed = engine.generate([_request("Tell me about rivers.", seed=99, temperature=1.0, max_tokens=16)])[0]
    assert other_seed.text != together[0].text


def test_every_request_gets_its_own_answer_whatever_its_batch(engine: VLLMBackend, adapter_dir: Path) -> None:
    """A plain request batched with adapter and soft-prompt requests answers as it does alone."""
    adapter = AdapterRef("style", str(adapter_dir))
    soft = SoftPrompt(np.random.default_rng(0).normal(size=(2, 128)).astype(np.float32))
    plain, tuned, embedded = _request("Prompt B here."), _request("Prompt A here.", adapter=adapter), _request("Prompt A here.", soft=soft)
    alone = [engine.generate([r])[0].text for r in (plain, tuned, embedded)]
    for batch in ([plain, tuned], [tuned, plain, embedded], [embedded, tuned, plain, plain]):
        answers = engine.generate(batch)
        for request, answer in zip(batch, answers):
            assert answer.text == alone[(plain, tuned, embedded).index(request)]
    same_prompt = engine.generate([_request("Prompt A here."), tuned])
    assert same_prompt[0].text != same_prompt[1].text  # the plain row is not answered with the adapter


def test_a_peft_adapter_is_served_per_prompt_as_hf_serves_it(engine: VLLMBackend, generator_dir: Path,
                                                             adapter_dir: Path) -> None:
    adapter = AdapterRef("style", str(adapter_dir))
    requests = [_request("Which way to the harbour?"), _request("Which way to the harbour?", adapter=adapter)]
    served = engine.generate(requests)
    reference = HFBackend(str(generator_dir), dtype="float32").generate(requests)
    assert [g.text for g in served] == [g.text for g in reference]
    assert served[0].text != served[1].text


def test_soft_prompts_go_in_as_prompt_embeddings(engine: VLLMBackend, generator_dir: Path) -> None:
    soft = SoftPrompt(np.random.default_rng(1).normal(scale=0.5, size=(3, 128)).astype(np.float32))
    plain, with_soft = engine.generate([_request("Name a colour."), _request("Name a colour.", soft=soft)])
    assert with_soft.prompt_tokens == plain.prompt_tokens + 3
    assert with_soft.text != plain.text
    reference = HFBackend(str(generator_dir), dtype="float32").generate([_request("Name a colour.", soft=soft)])
    assert with_soft.text == reference[0].text


def test_logprobs_for_the_weighted_judge(engine: VLLMBackend) -> None:
    answer = engine.generate([_request("Rate it.", max_tokens=3, logprobs=True, top_logprobs=5)])[0]
    assert answer.top_logprobs is not None and len(answer.top_logprobs) == answer.completion_tokens
    assert all(len(position) == 5 and all(v <= 0 for v in position.values()) for position in answer.top_logprobs)
    assert answer.logprob is not None and answer.logprob <= 0


def test_the_budget_keeps_one_engine_alive(generator_dir: Path, judge_dir: Path) -> None:
    import psutil

    def engine_processes() -> int:
        return sum("EngineCore" in " ".join(p.cmdline() + [p.name()]) for p in psutil.Process().children(recursive=True)
                   if p.is_running() and p.status() != psutil.STATUS_ZOMBIE)

    budget = EngineBudget(1)
    first, second = VLLMBackend(str(generator_dir), **ENGINE), VLLMBackend(str(judge_dir), **ENGINE)
    baseline_processes = engine_processes()  # the shared session engine's own
    most = 0
    try:
        for backend in (first, second):
            backend.bind_budget(budget)
        for backend in (first, second, first):
            backend.generate([_request("Hello there.", max_tokens=4)])
            most = max(most, engine_processes() - baseline_processes)
        assert budget.loads == 3 and budget.releases == 2 and budget.max_resident == 1
        assert most <= 1
    finally:
        first.close()
        second.close()
    assert budget.resident == 0


def test_structured_outputs_make_every_rating_of_a_random_judge_parseable(engine: VLLMBackend) -> None:
    from apm_bench.judging.judge import RatingRequest
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
    from apm_bench.world.catalog import load_catalog

    principles = list(load_catalog().default_pool().principles)
    requests = [RatingRequest(prompt=f"How do I boil {food}?", response=f"Put the {food} in water and wait.",
                              principle=principles[i % len(principles)].id, seed=i)
                for i, food in enumerate(["eggs", "rice", "pasta", "beans", "corn"] * 6)]
    shares = {}
    for constrained in (False, True):
        judge = LLMJudge(engine, principles, LLMJudgeConfig(constrained=constrained, retries=0, max_tokens=4))
        ratings = judge.rate(requests)
        shares[constrained] = sum(r.score is None for r in ratings) / len(ratings)
        if constrained:
            assert all(r.score is not None and 1 <= r.score <= 10 and r.score == int(r.score) for r in ratings)
    print(f"unparseable ratings of a random-weight judge: {shares[False]:.0%} free, {shares[True]:.0%} constrained")
    assert shares[True] == 0 and shares[False] > 0.5


def test_a_prefilled_answer_continues_on_the_engine_as_hf_continues_it(engine: VLLMBackend, generator_dir: Path) -> None:
    """The weighted judge reads P(10) from the distribution after a forced "1": the prefill must be
    the start of the answer, not a new turn, on the engine as in transformers."""
    hf = HFBackend(str(generator_dir), dtype="float32")
    asked = [GenerationRequest(chat(f"Rate answer {i} from 1 to 10."), seed=i, prefill="1",
                               params=SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=5))
             for i in range(4)]
    plain = [GenerationRequest(r.messages, seed=r.seed, params=r.params) for r in asked]
    on_engine, in_hf = engine.generate(asked), hf.generate(asked)
    for forced, unforced, reference in zip(on_engine, engine.generate(plain), in_hf):
        assert forced.prompt_tokens == unforced.prompt_tokens + 1  # "1" is one token, after the template
        assert forced.top_logprobs is not None and reference.top_logprobs is not None
        got, want = forced.top_logprobs[0], reference.top_logprobs[0]
        assert list(got)[:3] == list(want)[:3]
        assert all(abs(got[t] - want[t]) < 1e-3 for t in list(want)[:3])
    from apm_bench.judging.judge import RatingRequest
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
    from apm_bench.world.catalog import load_catalog

    principles = list(load_catalog().default_pool().principles)
    weighted = LLMJudge(engine, principles, LLMJudgeConfig(weighted=True, retries=0, max_tokens=2)).rate(
        [RatingRequest("How do I boil rice?", f"Answer {i}.", principles[i].id, seed=i) for i in range(4)])
    assert all(r.score is None or 1 <= r.score <= 10 for r in weighted)
