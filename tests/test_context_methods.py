"""RAG and the prior on the simulator: they help for the right reasons, and fail where they should
(POPI: test_popi.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fit_context import world_zero

from apm_bench.methods import UserView
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.rag import Rag
from apm_bench.methods.rag_advanced import RagAdvanced
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from apm_bench.run.setup import load_pool_catalog


def _pooled(result, method: str):  # type: ignore[no-untyped-def]
    return next(m for m in result.metrics if m.method == method and m.world == "pooled")


def test_rag_retrieves_users_like_the_query_user(embedder: HistoryEmbedder) -> None:
    engines, population, world, context = world_zero(embedder)
    label = {u.id: (u.attributes[0].attribute, u.attributes[0].side) for u in population.users}
    agreement = {}
    for mode in ("nearest", "random"):
        rag = Rag(neighbours=mode, k=5)
        rag.fit(context)
        found = rag.neighbours([world.users[u].history for u in world.split.test])
        agreement[mode] = np.mean([label[n] == label[u] for u, row in zip(world.split.test, found) for n in row])
    assert agreement["nearest"] > 2 * agreement["random"]
    engines.close()


def test_rag_advanced_describes_users_and_their_rated_pairs_and_retrieves_on_the_descriptions(embedder: HistoryEmbedder) -> None:
    engines, population, world, context = world_zero(embedder)
    people = {u.id: u for u in population.users}
    catalog = load_pool_catalog(RunConfig())
    writing = {(a.id, side): getattr(a, side).description for a in catalog.attributes for side in ("follow", "avoid")}
    method = RagAdvanced(k=5)
    method.fit(context)
    assert len(method.descriptions) > 0.8 * len(context.train_users)
    # the vibe says how the user writes (their attribute side), never what they want
    described = [writing[(people[u].attributes[0].attribute, people[u].attributes[0].side)] in vibe
                 for u, (vibe, _) in method.descriptions.items()]
    assert np.mean(described) > 0.8
    # the preference description, written from the best and worst candidate, names the top target's side
    keyword = {p.id: p.keywords[0] for p in catalog.principles}
    agree = []
    for u, (_, preference) in method.descriptions.items():
        top = max(world.targets[u], key=lambda t: abs(t.weight))
        stated = f"{'likes' if top.side == 'follow' else 'dislikes'} {keyword[top.principle]} answers"
        opposite = f"{'dislikes' if top.side == 'follow' else 'likes'} {keyword[top.principle]} answers"
        agree.append((f"user {stated}" in preference) - (f"user {opposite}" in preference))
    assert np.mean(agree) > 0.3
    # retrieval on the vibes finds users who write like the test user
    label = {u.id: (u.attributes[0].attribute, u.attributes[0].side) for u in population.users}
    tests = [UserView(u, tuple(world.users[u].history)) for u in world.split.test]
    found = method.neighbours(tests)
    assert np.mean([label[n] == label[t.id] for t, row in zip(tests, found) for n in row]) > 0.5
    engines.close()


@pytest.fixture(scope="module")
def rag_runs(embedder: HistoryEmbedder) -> dict[str, object]:
    """Six worlds of the default config. The tests reading them are `slow` (`make test-slow`): their
    claims (a gain, and none with random neighbours) are measured at that size, not a smaller one."""
    runs = {}
    for model in ("sim-large", "sim-small"):
        methods = ["rag", "rag-advanced"] if model == "sim-large" else ["rag"]
        runs[model] = run_benchmark(RunConfig(methods=methods, model=model, worlds=list(range(6))), embedder=embedder)
    runs["random"] = run_benchmark(RunConfig(methods=["rag"], worlds=list(range(6)),
                                             method_options={"rag": {"neighbours": "random"}}), embedder=embedder)
    return runs


@pytest.mark.slow
def test_rag_helps_the_model_that_imitates_examples(rag_runs: dict) -> None:
    large, small = _pooled(rag_runs["sim-large"], "rag"), _pooled(rag_runs["sim-small"], "rag")
    assert large.delta > 0 and large.ci_low > 0
    assert large.delta > small.delta + 0.1


@pytest.mark.slow
def test_rag_advanced_helps_through_its_neighbours_preference_descriptions(rag_runs: dict) -> None:
    advanced = _pooled(rag_runs["sim-large"], "rag-advanced")
    assert advanced.ci_low > 0
    samples = rag_runs["sim-large"].samples
    prompts = samples[samples["method"] == "rag-advanced"]["system_prompt"]
    assert prompts.str.contains("have shown these preferences").all() and not prompts.str.contains("<example>").any()


@pytest.mark.slow
def test_rag_with_random_neighbours_loses_its_gain(rag_runs: dict) -> None:
    real, random = _pooled(rag_runs["sim-large"], "rag"), _pooled(rag_runs["random"], "rag")
    assert random.ci_low < 0 < random.ci_high or random.delta < real.delta / 3
    assert real.delta > random.delta + 0.1


def test_prior_instructs_the_label_with_the_best_mean_over_training_users(embedder: HistoryEmbedder) -> None:
    from apm_bench.methods.simple import Prior
    from apm_bench.world.prompting import style_instruction

    engines, _, world, context = world_zero(embedder, n_train=60)
    scores = np.stack([context.feedback.scores(u.id) for u in context.train_users])
    best = context.feedback.labels[int(np.nanargmax(np.nanmean(scores, axis=0)))]
    prior = Prior()
    prior.fit(context)
    principle = next(p for p in context.principles if p.id == best.principle)
    for user_id in world.split.test[:3]:
        made = prior.personalize(UserView(user_id, tuple(world.users[user_id].history)), "hello")
        assert made.messages[0].content == style_instruction(principle, best.side)
    assert prior.personalize(UserView("x", ()), "hi").messages == prior.personalize(UserView("y", ("long past",)), "hi").messages
    engines.close()


class _ConstantFeedback:
    """A judge that rates every candidate alike: nothing to tell best from worst."""

    def __init__(self, feedback) -> None:  # type: ignore[no-untyped-def]
        self._feedback = feedback
        self.calls = 0

    def candidates(self, user_id: str):  # type: ignore[no-untyped-def]
        return self._feedback.candidates(user_id)

    def scores(self, user_id: str) -> np.ndarray:
        return np.full(len(self._feedback.candidates(user_id)), 5.0)


@pytest.mark.parametrize("method", ["rag", "soft-prompt"])
def test_a_judge_that_tells_no_candidates_apart_stops_the_method_with_a_clear_error(
        method: str, embedder: HistoryEmbedder) -> None:
    import dataclasses

    from apm_bench.errors import ApmError, UninformativeFeedbackError
    from apm_bench.methods import METHODS

    engines, _, _, context = world_zero(embedder, n_train=20)
    try:
        constant = dataclasses.replace(context, feedback=_ConstantFeedback(context.feedback))
        with pytest.raises(UninformativeFeedbackError, match=f"^{method}: .*rated every candidate alike") as caught:
            METHODS.get(method)().fit(constant)
        assert isinstance(caught.value, ApmError)  # the CLI prints it as one `error:` line
    finally:
        engines.close()
