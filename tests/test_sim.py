"""The style simulator: rendering ↔ measuring, the judge, the trainable policy, the backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apm_bench.backends import load_backend
from apm_bench.backends.base import AdapterRef, GenerationRequest, Message, SamplingParams, SoftPrompt, chat
from apm_bench.judging.judge import RatingRequest
from apm_bench.judging.sim_judge import SimJudge, SimJudgeConfig
from apm_bench.sim.style import StyleCodec
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompting import example_block, style_instruction

PROMPT = "How do I keep homemade bread from going stale so quickly?"


def test_render_then_measure_recovers_the_style(catalog: Catalog) -> None:
    codec = StyleCodec(catalog.principles)
    rng = np.random.default_rng(0)
    for _ in range(200):
        style = rng.integers(-2, 3, size=codec.size)
        assert np.array_equal(codec.levels(codec.render(PROMPT, style, rng)), style)


def test_judge_maps_levels_to_scores_and_applies_bias(catalog: Catalog) -> None:
    codec = StyleCodec(catalog.principles)
    rng = np.random.default_rng(1)
    casual = catalog.principle_ids.index("casual")
    high = np.zeros(codec.size, dtype=int)
    high[casual] = 2
    low = -high
    exact = SimJudge(catalog.principles, SimJudgeConfig(noise=0.0))
    lenient = SimJudge(catalog.principles, SimJudgeConfig(noise=0.0, bias=2.0, principle_bias={"casual": 1.0}))
    texts = [codec.render(PROMPT, s, rng) for s in (high, low, np.zeros(codec.size, dtype=int))]
    requests = [RatingRequest(PROMPT, t, "casual") for t in texts]
    assert [r.score for r in exact.rate(requests)] == [10.0, 2.0, 6.0]  # 5.5 ± 4, rounded half to even
    assert [r.score for r in lenient.rate(requests)] == [10.0, 4.0, 8.0]


def test_judge_noise_is_deterministic_per_request_and_failures_are_reported(catalog: Catalog) -> None:
    judge = SimJudge(catalog.principles, SimJudgeConfig(noise=1.0, failure_rate=0.3))
    requests = [RatingRequest(PROMPT, f"response {i}", "gentle", seed=0) for i in range(400)]
    first, second = judge.rate(requests), judge.rate(requests)
    assert [r.score for r in first] == [r.score for r in second]
    failed = [r for r in first if r.failed]
    assert 0.22 < len(failed) / len(first) < 0.38
    assert all(r.error for r in failed)
    assert len({r.score for r in first if not r.failed}) > 2  # noise spreads neutral texts over several scores


def test_weighted_judge_gives_expected_scores(catalog: Catalog) -> None:
    codec = StyleCodec(catalog.principles)
    judge = SimJudge(catalog.principles, SimJudgeConfig(noise=1.0, weighted=True))
    style = np.zeros(codec.size, dtype=int)
    style[catalog.principle_ids.index("gentle")] = 1
    rating = judge.rate([RatingRequest(PROMPT, codec.render(PROMPT, style, np.random.default_rng(0)), "gentle")])[0]
    assert rating.score is not None and 7.0 < rating.score < 7.6 and rating.score != round(rating.score)


def _mean_level(backend, messages, principle: str, catalog: Catalog, n: int = 300) -> float:  # type: ignore[no-untyped-def]
    requests = [GenerationRequest(messages=messages, seed=s) for s in range(n)]
    codec = StyleCodec(catalog.principles)
    index = catalog.principle_ids.index(principle)
    return float(np.mean([codec.levels(g.text)[index] for g in backend.generate(requests)]))


def test_instructions_move_style_and_the_large_model_follows_more(catalog: Catalog) -> None:
    gentle = catalog.principle("gentle")
    shifts = {}
    for model in ("sim-small", "sim-large"):
        backend = load_backend(model, catalog)
        plain = _mean_level(backend, chat(PROMPT), "gentle", catalog)
        follow = _mean_level(backend, chat(PROMPT, style_instruction(gentle, "follow")), "gentle", catalog)
        avoid = _mean_level(backend, chat(PROMPT, style_instruction(gentle, "avoid")), "gentle", catalog)
        assert avoid < plain < follow
        shifts[model] = follow - avoid
    assert shifts["sim-large"] > shifts["sim-small"] + 0.5


def test_examples_are_imitated_more_by_the_large_model(catalog: Catalog) -> None:
    codec = StyleCodec(catalog.principles)
    index = catalog.principle_ids.index("casual")
    casual, formal = np.zeros(codec.size, dtype=int), np.zeros(codec.size, dtype=int)
    casual[index], formal[index] = 2, -2
    rng = np.random.default_rng(0)
    system = "Similar users rated these responses:\n" + example_block(
        PROMPT, codec.render(PROMPT, casual, rng), codec.render(PROMPT, formal, rng)
    )
    gains = {}
    for model in ("sim-small", "sim-large"):
        backend = load_backend(model, catalog)
        gains[model] = _mean_level(backend, chat(PROMPT, system), "casual", catalog) - _mean_level(
            backend, chat(PROMPT), "casual", catalog
        )
    assert gains["sim-small"] > 0.1
    assert gains["sim-large"] > gains["sim-small"]


def test_preference_talk_is_read_with_negation(catalog: Catalog) -> None:
    backend = load_backend("sim-large", catalog)
    likes = _mean_level(backend, chat(PROMPT, "This user prefers casual, relaxed answers."), "casual", catalog)
    dislikes = _mean_level(backend, chat(PROMPT, "This user does not like casual answers."), "casual", catalog)
    assert likes > 0.5 and dislikes < -0.5


def test_same_seed_same_text_and_logprobs_match_the_policy(catalog: Catalog) -> None:
    backend = load_backend("sim-large", catalog)
    request = GenerationRequest(chat(PROMPT), seed=11, params=SamplingParams(logprobs=True))
    first, second = backend.generate([request, request])
    assert first.text == second.text
    assert first.logprob is not None and first.logprob < 0
    other = backend.generate([GenerationRequest(chat(PROMPT), seed=12)])[0]
    assert other.text != first.text


def test_a_conversation_reads_as_the_sum_of_its_messages(catalog: Catalog) -> None:
    """The reader memoises each message's attribute evidence; the sum must be what reading the
    whole conversation at once finds."""
    reader = load_backend("sim-large", catalog).reader
    phrases = [p for a in catalog.attributes for side in ("follow", "avoid") for p in a.side(side).phrases]

    @given(st.lists(st.lists(st.sampled_from([*phrases, PROMPT, "and", ""]), max_size=6).map(" ".join), max_size=6))
    @settings(max_examples=150, deadline=None)
    def check(messages: list[str]) -> None:
        together = reader.attribute_evidence("\n".join(messages))
        assert np.array_equal(reader.messages_evidence(messages), together)
        assert np.array_equal(reader.messages_evidence(messages), together)  # from the memo

    check()


def test_answers_without_torch_match_the_torch_policy(catalog: Catalog) -> None:
    """Plain requests are answered in numpy; with a (still neutral) adapter they go through the torch
    policy. The two must draw the same responses with the same log-probabilities."""
    backend = load_backend("sim-large", catalog)
    casual = catalog.principles[0]
    contexts = [chat(PROMPT), chat(PROMPT, style_instruction(casual, "follow")), chat(PROMPT, style_instruction(casual, "avoid")),
                chat(PROMPT, "This user does not like casual answers."), chat("I'm a night owl. " + PROMPT)]
    plain = [GenerationRequest(c, seed=seed, params=SamplingParams(temperature=t, logprobs=True))
             for c in contexts for seed in range(20) for t in (0.3, 1.0)]
    backend.add_adapter("neutral")  # B starts at zero: the same distribution, through torch
    adapted = [GenerationRequest(r.messages, seed=r.seed, params=r.params, adapter=AdapterRef("neutral")) for r in plain]
    numpy_answers, torch_answers = backend.generate(plain), backend.generate(adapted)
    assert [a.text for a in numpy_answers] == [a.text for a in torch_answers]
    assert [a.logprob for a in numpy_answers] == pytest.approx([a.logprob for a in torch_answers], abs=1e-5)
    scored = backend.sequence_logprob(plain, [a.text for a in numpy_answers]).tolist()
    assert [a.logprob for a in numpy_answers] == pytest.approx(scored, abs=1e-5)
    assert len({a.text for a in numpy_answers}) > len(contexts)  # the draws differ by seed


def test_adapter_starts_neutral_then_changes_the_distribution_and_trains(catalog: Catalog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = load_backend("sim-large", catalog)
    policy = backend.policy
    features = backend.features([chat(PROMPT)])
    adapter = policy.add_adapter("mine", rank=2)
    base = policy.push(features)
    assert torch.allclose(policy.push(features, ["mine"]), base)  # zero-initialised like LoRA
    styles = torch.zeros(1, policy.n_principles)
    styles[0, catalog.principle_ids.index("gentle")] = 2
    optimiser = torch.optim.SGD(adapter.parameters(), lr=0.5)
    before = policy.style_log_prob(policy.push(features, ["mine"]), styles).item()
    for _ in range(20):
        optimiser.zero_grad()
        loss = -policy.style_log_prob(policy.push(features, ["mine"]), styles).sum()
        loss.backward()
        optimiser.step()
    after = policy.style_log_prob(policy.push(features, ["mine"]), styles).item()
    assert after > before + 1.0
    path = tmp_path / "mine.pt"
    policy.save_adapter("mine", str(path))
    fresh = load_backend("sim-large", catalog)
    request = GenerationRequest(chat(PROMPT), seed=3, adapter=AdapterRef("mine", str(path)), params=SamplingParams(logprobs=True))
    plain = GenerationRequest(chat(PROMPT), seed=3, params=SamplingParams(logprobs=True))
    with_adapter, without = fresh.generate([request, plain])
    gentle = catalog.principle_ids.index("gentle")
    codec = StyleCodec(catalog.principles)
    levels = [codec.levels(g.text)[gentle] for g in fresh.generate([GenerationRequest(chat(PROMPT), seed=s, adapter=AdapterRef("mine", str(path))) for s in range(100)])]
    assert np.mean(levels) > 1.0
    assert with_adapter.logprob != without.logprob


def test_soft_prompt_shifts_the_push_and_receives_gradients(catalog: Catalog) -> None:
    backend = load_backend("sim-large", catalog)
    policy = backend.policy
    features = backend.features([chat(PROMPT)])
    soft = torch.zeros(1, policy.profile.hidden_size, requires_grad=True)
    styles = torch.zeros(1, policy.n_principles)
    log_prob = policy.style_log_prob(policy.push(features, soft_prompts=[soft]), styles)
    log_prob.sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    embedding = np.random.default_rng(0).standard_normal((2, policy.profile.hidden_size)) * 3
    shifted = backend.push_for([GenerationRequest(chat(PROMPT), seed=0, soft_prompt=SoftPrompt(embedding))])
    assert not torch.allclose(shifted, policy.push(features))


def test_backend_declares_its_capabilities(catalog: Catalog) -> None:
    backend = load_backend("sim-small", catalog)
    caps = backend.capabilities
    assert caps.logprobs and caps.adapters and caps.soft_prompts and caps.trainable
    assert backend.generate([]) == []
    with pytest.raises(KeyError):
        backend.generate([GenerationRequest((Message("user", PROMPT),), seed=0, adapter=AdapterRef("absent"))])
