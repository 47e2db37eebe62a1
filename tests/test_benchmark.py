"""End-to-end properties of the benchmark on the simulator.

These are the tests that fail if the benchmark were wrong: the information barrier, sign
balancing under a biased judge, determinism, and the acceptance results on the default config.
"""

from __future__ import annotations

import gc
import types
from typing import Literal

import numpy as np
import pytest

from apm_bench.backends.base import chat
from apm_bench.errors import InformationBarrierError
from apm_bench.methods import FitContext, Personalization, Personalizer, UserView, register_method
from apm_bench.methods.base import MethodOptions
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from apm_bench.run.setup import prepare
from apm_bench.world.catalog import load_catalog
from apm_bench.world.prompting import style_instruction
from apm_bench.world.users import Target
from apm_bench.world.world import build_world

SMALL = dict(users=200, history_len=2, bootstrap_resamples=500)


@register_method("test-constant-elaborate")
class ConstantElaborate(Personalizer):
    """Non-personalizing: the same instruction for everyone."""

    description = "test helper"

    def fit(self, context: FitContext) -> None:
        self.principle = next(p for p in context.principles if p.id == "elaborate")

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return Personalization(chat(prompt, system=style_instruction(self.principle, "follow")))


SEEN: dict[str, object] = {}


@register_method("test-spy")
class Spy(Personalizer):
    """Keeps everything it is handed, so the test can search it for hidden information."""

    description = "test helper"

    def fit(self, context: FitContext) -> None:
        SEEN["context"] = context
        SEEN["test_users"] = []
        try:
            context.feedback.scores(SEEN["probe_test_user"])  # type: ignore[arg-type]
        except InformationBarrierError as exc:
            SEEN["refused"] = str(exc)

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        SEEN["test_users"].append((user, prompt))  # type: ignore[union-attr]
        return Personalization(chat(prompt))


def _pooled(result, method: str):  # type: ignore[no-untyped-def]
    return next(m for m in result.metrics if m.method == method and m.world == "pooled")


def _reachable(roots: list[object], limit: int = 3_000_000) -> list[object]:
    """Every object reachable from roots through references (modules and classes excluded)."""
    seen: set[int] = set()
    stack = list(roots)
    found = []
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        found.append(obj)
        stack.extend(gc.get_referents(obj))
    assert len(seen) < limit, "object graph too large to search"
    return found


def test_information_barrier(embedder: HistoryEmbedder) -> None:
    config = RunConfig(methods=["test-spy"], worlds=[0], **SMALL)
    catalog, population = prepare(config)
    world = build_world(population, catalog, 0, validation_fraction=config.validation_fraction, test_fraction=config.test_fraction)
    SEEN.clear()
    SEEN["probe_test_user"] = world.split.test[0]
    run_benchmark(config, embedder=embedder)

    assert "not a training user" in str(SEEN["refused"])
    handed = SEEN["test_users"]
    assert {u.id for u, _ in handed} == set(world.split.test)  # type: ignore[union-attr]
    for user, _prompt in handed:  # type: ignore[union-attr]
        assert type(user) is UserView and set(vars(user)) == {"id", "history"}

    test_ids = set(world.split.test)
    reachable = _reachable([SEEN["context"], handed])
    matrices = [o for o in reachable if isinstance(o, np.ndarray) and o.shape == world.matrix.shape]
    assert not any(np.array_equal(m, world.matrix) for m in matrices), "C is reachable from what a method is handed"
    feedback = SEEN["context"].feedback  # type: ignore[union-attr]
    assert test_ids.isdisjoint(feedback._targets)
    target_holders = [o for o in reachable if isinstance(o, dict) and o and all(isinstance(k, str) for k in o) and any(
        isinstance(v, list) and v and isinstance(v[0], Target) for v in o.values())]
    for holder in target_holders:
        assert test_ids.isdisjoint(holder), "a test user's targets are reachable"


def test_biased_judge_cannot_pose_as_personalization(embedder: HistoryEmbedder) -> None:
    """A judge that loves 'elaborate' answers: always being elaborate must not earn a Δ."""
    config = RunConfig(
        methods=["test-constant-elaborate"],
        worlds=[0, 1, 2],
        judge={"bias": 1.0, "principle_bias": {"elaborate": 1.0}},
        **SMALL,
    )
    result = run_benchmark(config, embedder=embedder)
    constant = _pooled(result, "test-constant-elaborate")
    assert constant.ci_low < 0 < constant.ci_high

    # Without sign balancing (raw scores, no 11 − s flip) the same judge would reward it.
    samples = result.samples
    raw = samples.assign(raw=samples["ratings"].map(lambda r: float(np.mean([s for s in r if s is not None]))))
    mine = raw[raw["method"] == "test-constant-elaborate"].set_index(["world", "user_id"])["raw"]
    base = raw[raw["method"] == "baseline"].set_index(["world", "user_id"])["raw"]
    elaborate_users = samples[samples["method"] == "baseline"].set_index(["world", "user_id"])["targets"].map(
        lambda ts: any(t["principle"] == "elaborate" for t in ts))
    naive = (mine - base)[elaborate_users]
    assert naive.mean() > 1.0, naive.mean()


def test_same_seed_same_metrics_other_seed_other_world(embedder: HistoryEmbedder) -> None:
    config = RunConfig(methods=["routing"], worlds=[5], cache=None, **SMALL)  # computed, not read back
    first = run_benchmark(config, embedder=embedder)
    second = run_benchmark(config, embedder=embedder)
    assert [m.model_dump() for m in first.metrics] == [m.model_dump() for m in second.metrics]
    other = run_benchmark(config.model_copy(update={"worlds": [6]}), embedder=embedder)
    assert [m.delta for m in other.metrics] != [m.delta for m in first.metrics]
    catalog, population = prepare(config)
    assert not np.array_equal(build_world(population, catalog, 5).matrix, build_world(population, catalog, 6).matrix)


def test_failed_judge_ratings_are_counted(embedder: HistoryEmbedder) -> None:
    result = run_benchmark(RunConfig(methods=["history"], worlds=[0], judge={"failure_rate": 0.2}, **SMALL), embedder=embedder)
    history = _pooled(result, "history")
    rows = result.samples[result.samples["method"] == "history"]
    assert history.failed_ratings > 0
    assert history.failed_ratings == int(rows["failed_ratings"].sum())  # every failure is reported
    all_failed = rows["failed_ratings"] == rows["targets"].map(len)
    assert rows.loc[all_failed, "reward"].isna().all()  # never scored as 0
    assert history.unscorable_users == int((rows["reward"].isna() | rows["baseline_reward"].isna()).sum())


@pytest.fixture(scope="module")
def default_run(embedder: HistoryEmbedder):  # type: ignore[no-untyped-def]
    """The default config (3 worlds, 400 users), all four label strategies, history side by side.
    Its tests are `slow` (`make test-slow`): their claims are about the default size, so it cannot shrink;
    the no-history controls below, also `slow`, read most of their calls from the cache it fills."""
    return run_benchmark(RunConfig(methods=["routing", "history"], label_strategy=["all"]), embedder=embedder)


@pytest.mark.slow
def test_default_config_oracle_and_routing_improve_significantly(default_run) -> None:  # type: ignore[no-untyped-def]
    assert default_run.config.worlds == [0, 1, 2]
    oracle = _pooled(default_run, "oracle")
    routing = _pooled(default_run, "routing[margin]")  # the default strategy
    assert oracle.ci_low > 0
    assert routing.ci_low > 0
    assert routing.gain is not None and 0 < routing.gain < 1
    labels = {m.method for m in default_run.metrics}
    assert {"routing[abs]", "routing[abs_two_sided]", "routing[margin]", "routing[regression]", "history"} <= labels


@pytest.mark.slow
def test_the_prior_runs_beside_every_method_and_earns_nothing_on_a_balanced_population(default_run) -> None:  # type: ignore[no-untyped-def]
    prior = _pooled(default_run, "prior")
    assert prior.n_users == _pooled(default_run, "routing[margin]").n_users
    assert prior.ci_low < 0 < prior.ci_high
    assert abs(prior.delta) < 0.15
    assert _pooled(default_run, "routing[margin]").ci_low > prior.ci_high  # routing reads histories, the prior cannot


@pytest.mark.slow
def test_routing_diagnostics_measure_chosen_labels_against_true_top_targets(default_run) -> None:  # type: ignore[no-untyped-def]
    from apm_bench.judging.label_diagnostics import top_label

    diagnostics = {(d.method, d.world): d for d in default_run.label_diagnostics}
    routing, prior = diagnostics[("routing[margin]", "pooled")], diagnostics[("prior", "pooled")]
    assert {("routing[margin]", w) for w in ("0", "1", "2")} <= set(diagnostics)
    assert "history" not in {d.method for d in default_run.label_diagnostics}  # it routes nothing
    # recomputed from samples.parquet's own columns: the chosen label against the largest-|weight| target
    rows = default_run.samples[default_run.samples["method"] == "routing[margin]"]
    hits = (rows["routed_to"] == rows["targets"].map(top_label)).mean()
    assert routing.n_users == len(rows) and routing.label_accuracy == pytest.approx(hits)
    assert sum(sum(r.values()) for r in routing.confusion.values()) == routing.n_users
    diagonal = sum(row.get(true, 0) for true, row in routing.confusion.items())
    assert diagonal / routing.n_users == pytest.approx(routing.principle_accuracy)
    # 20 labels: chance is 0.05; routing reads histories, the prior gives everyone one label
    assert routing.label_accuracy > 0.25 > prior.label_accuracy
    # the judge's training labels are better than what the classifier recovers from histories
    assert routing.training_label_accuracy is not None and routing.training_users > 0
    assert routing.training_label_accuracy > routing.label_accuracy
    assert prior.training_label_accuracy is None


def _lopsided_population(path, n_users: int, follow_share: float) -> None:  # type: ignore[no-untyped-def]
    """A reference-format file whose users all have 'verbose' active, most on its follow side."""
    import json

    from apm_bench.world.prompts import load_prompts

    texts = [p.text for p in load_prompts()]
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(n_users):
            side = "follow" if index < follow_share * n_users else "avoid"
            conversations = [{"messages": [{"role": "user", "content": texts[(index * 3 + k) % len(texts)]}]} for k in range(3)]
            handle.write(json.dumps({"user_idx": index, "rewrite_style_attributes": [{"attribute": "verbose", "side": side}],
                                     "conversations": conversations}) + "\n")


def test_the_prior_row_exposes_a_lopsided_population(embedder: HistoryEmbedder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The failure the balanced design prevents, on an imported population that is not balanced:
    one instruction for everyone wins, and routing wins without any history. The prior row shows it."""
    path = tmp_path / "lopsided.jsonl"
    _lopsided_population(path, 200, follow_share=0.75)
    config = RunConfig(methods=["routing"], conversations_file=path, worlds=[0, 1], control="no-history", bootstrap_resamples=500)
    result = run_benchmark(config, embedder=embedder)
    assert _pooled(result, "prior").ci_low > 0
    assert _pooled(result, "routing").ci_low > 0


def test_split_per_world_gives_each_world_its_own_stratified_split(embedder: HistoryEmbedder) -> None:
    def test_users(split_per_world: bool) -> dict[int, set[str]]:
        config = RunConfig(methods=["prior"], worlds=[0, 1], split_per_world=split_per_world, **SMALL)
        samples = run_benchmark(config, embedder=embedder).samples
        return {w: set(rows["user_id"]) for w, rows in samples[samples["method"] == "prior"].groupby("world")}

    fixed, fresh = test_users(False), test_users(True)
    assert fixed[0] == fixed[1]
    assert fresh[0] != fresh[1] and len(fresh[0]) == len(fresh[1]) == len(fixed[0])


@pytest.mark.slow  # a control at the default size: a smaller one would hide a leak in a wider interval
def test_no_history_control_removes_routing_gain(embedder: HistoryEmbedder) -> None:
    result = run_benchmark(RunConfig(methods=["routing"], control="no-history"), embedder=embedder)
    routing = _pooled(result, "routing")
    assert routing.ci_low < 0 < routing.ci_high
    assert _pooled(result, "oracle").ci_low > 0  # the control hides histories, not the world


@pytest.mark.slow  # a control at the default size: a smaller one would hide a leak in a wider interval
def test_shuffled_history_control_removes_routing_gain(embedder: HistoryEmbedder) -> None:
    result = run_benchmark(RunConfig(methods=["routing"], control="shuffled-history"), embedder=embedder)
    routing = _pooled(result, "routing")
    assert routing.ci_low < 0 < routing.ci_high


class PhraseReaderOptions(MethodOptions):
    mapping: Literal["stereotype", "given"] = "stereotype"
    matrix: list[list[float]] | None = None


@register_method("test-phrase-reader")
class PhraseReader(Personalizer):
    """Reads attribute phrases in the history (perfect attribute detection), then maps them either
    through the stereotype table (what an LLM would assume) or through a C handed to it by the test."""

    description = "test helper"
    Options = PhraseReaderOptions
    options: PhraseReaderOptions

    def fit(self, context: FitContext) -> None:
        catalog = load_catalog().with_pool(len(context.principles))
        self.principles = context.principles
        self.phrases = [(i, 1.0 if side == "follow" else -1.0, phrase)
                        for i, a in enumerate(catalog.attributes) for side in ("follow", "avoid") for phrase in a.side(side).phrases]
        ids = [p.id for p in context.principles]
        stereotype = np.zeros((len(ids), len(catalog.attributes)))
        for j, attribute in enumerate(catalog.attributes):
            for principle, weight in attribute.stereotype.items():
                stereotype[ids.index(principle), j] = weight
        self.mapping = np.array(self.options.matrix) if self.options.mapping == "given" else stereotype

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        evidence = np.zeros(self.mapping.shape[1])
        for index, sign, phrase in self.phrases:
            evidence[index] += sign * sum(phrase in message for message in user.history)
        response = self.mapping @ evidence
        if not np.any(response):
            return Personalization(chat(prompt))
        top = int(np.argmax(np.abs(response)))
        side = "follow" if response[top] > 0 else "avoid"
        return Personalization(chat(prompt, system=style_instruction(self.principles[top], side)))


def test_history_carries_the_signal_but_stereotypes_earn_nothing(embedder: HistoryEmbedder) -> None:
    """Perfect attribute detection is worth a lot when C is known and nothing through stereotypes."""
    config = RunConfig(methods=["test-phrase-reader"], worlds=[3])
    catalog, population = prepare(config)
    world = build_world(population, catalog, 3, validation_fraction=config.validation_fraction,
                        test_fraction=config.test_fraction, split_seed=config.data_seed)
    knows_c = run_benchmark(config.model_copy(update={"method_options": {
        "test-phrase-reader": {"mapping": "given", "matrix": world.matrix.tolist()}}}), embedder=embedder)
    informed = _pooled(knows_c, "test-phrase-reader")
    assert informed.ci_low > 0 and informed.gain is not None and informed.gain > 0.6

    stereotyped = run_benchmark(config.model_copy(update={"worlds": [0, 1, 2, 3, 4, 5]}), embedder=embedder)
    guess = _pooled(stereotyped, "test-phrase-reader")
    assert guess.ci_low < 0 < guess.ci_high
    assert abs(guess.delta) < 0.25 * informed.delta


def test_a_shared_baseline_is_generated_and_judged_once_for_every_world(embedder: HistoryEmbedder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = RunConfig(methods=["routing"], users=60, worlds=[0, 1, 2], history_len=2, split_per_world=False,
                       shared_baseline=True, cache=tmp_path / "calls.sqlite", out=tmp_path / "runs")
    result = run_benchmark(config, embedder=embedder)
    baseline = result.samples[result.samples["method"] == "baseline"]
    per_world = {w: rows.set_index("user_id")["response"].to_dict() for w, rows in baseline.groupby("world")}
    assert per_world[0] == per_world[1] == per_world[2]  # one response per test user, whatever the world
    generations = result.costs["phase:generation"]
    test_users = len(per_world[0])
    # the baseline's generations are computed once, not once per world
    assert generations["generation_cache_misses"] <= generations["requests"] - 2 * test_users
    separate = run_benchmark(config.model_copy(update={"shared_baseline": False, "cache": tmp_path / "other.sqlite"}),
                             embedder=embedder)
    responses = separate.samples[separate.samples["method"] == "baseline"].groupby("world")["response"].apply(list)
    assert responses[0] != responses[1]  # by default each world draws its own baseline


@pytest.mark.parametrize(("methods", "embeds"), [(["routing", "history"], True), (["history"], False)])
def test_phi_starts_on_every_shown_history_before_the_candidates_only_where_a_method_embeds(
        methods: list[str], embeds: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from apm_bench.judging.candidates import CandidateBank

    events: list[tuple[str, int]] = []
    prefetch, ensure = HistoryEmbedder.prefetch, CandidateBank.ensure
    monkeypatch.setattr(HistoryEmbedder, "prefetch", lambda self, texts: (events.append(("phi", len(set(texts)))), prefetch(self, texts))[1])
    monkeypatch.setattr(CandidateBank, "ensure", lambda self, prompts: (events.append(("candidates", len(prompts))), ensure(self, prompts))[1])
    embedder = HistoryEmbedder()
    result = run_benchmark(RunConfig(methods=methods, users=60, worlds=[0], history_len=3, cache=None), embedder=embedder)
    _, population = prepare(result.config)
    shown = {m for user in population.users for m in user.history}
    if embeds:
        assert events[0] == ("phi", len(shown)) and events[1][0] == "candidates"
        assert embedder.encoded_texts == len(shown)  # each text once: the methods took the prefetched vectors
    else:
        assert [kind for kind, _ in events] == ["candidates"] and embedder.encoded_texts == 0
