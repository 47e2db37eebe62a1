"""The run: world → methods → generation → judging → metrics, for every world seed.

Everything a run needs is built here from the config and passed down explicitly; there are no
module-level engines. The population, candidate bank and embedder are shared across worlds, since
none of them depends on the hidden mapping.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apm_bench.backends.base import GenerationRequest, SamplingParams
from apm_bench.errors import ConfigError
from apm_bench.judging.candidates import CandidateBank
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.judging.judge import Rating, RatingRequest
from apm_bench.judging.label_diagnostics import LabelDiagnostics, label_diagnostics, training_label_accuracy
from apm_bench.judging.metrics import MethodMetrics, compute_metrics
from apm_bench.judging.reward import weighted_reward
from apm_bench.methods import METHODS, FitContext, FitUser, Personalizer, UserView
from apm_bench.methods.artifacts import ArtifactStore
from apm_bench.methods.context_budget import ContextBudget
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.inputs import check_output_dir
from apm_bench.run.config import RunConfig, check_memory
from apm_bench.run.engines import Engines, build_engines, check_roles
from apm_bench.sim.style import stable_seed
from apm_bench.sim.writer import SimHistoryWriter
from apm_bench.world.catalog import Catalog, load_catalog
from apm_bench.world.histories import (
    HistoryWriter,
    Population,
    build_population,
    import_reference_conversations,
    keep_history,
)
from apm_bench.world.prompts import NeutralPrompt, load_prompts, split_prompt_pools
from apm_bench.world.world import World, build_world

BASELINE = "baseline"
ORACLE = "oracle"
PRIOR = "prior"
#: reference rows in every run: what everything is compared with, the upper bound, and what a
#: method earns without reading any history
REFERENCES = (BASELINE, ORACLE, PRIOR)
Progress = Callable[[str, int, int], None]
"""Called as progress(stage, stages_done, stages_total) when a stage starts, and once at the end."""


@dataclass(frozen=True)
class MethodVariant:
    """One row of the results: a registered method with fixed options, under a display name."""

    label: str
    method: str
    options: dict[str, Any]


@dataclass
class RunResult:
    config: RunConfig
    samples: pd.DataFrame
    metrics: list[MethodMetrics]
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    population_source: str = ""
    #: one entry per trained (or reused) adapter: world, method, name, steps, examples, seconds, losses
    training: list[dict[str, Any]] = field(default_factory=list)
    artifacts: ArtifactStore | None = None
    #: routing diagnostics: chosen labels against true top targets, per method and world
    label_diagnostics: list[LabelDiagnostics] = field(default_factory=list)
    #: the principle and attribute ids of the run's pool, in order (pools are catalog data, so record them)
    pool_members: dict[str, list[str]] = field(default_factory=dict)


def artifact_store(config: RunConfig) -> ArtifactStore:
    """Beside the call cache, so a resumed run finds what it trained; a private folder without one."""
    if config.cache is not None:
        return ArtifactStore(Path(config.cache).parent / "artifacts")
    return ArtifactStore(Path(tempfile.mkdtemp(prefix="apm-artifacts-")))


def plan_methods(config: RunConfig, references: tuple[str, ...] | None = None) -> list[MethodVariant]:
    """The reference rows first (baseline, oracle for gain, prior, and the bound gain is measured
    against where that is another method), then the asked methods. A study that needs other
    references (the robustness check compares with the baseline alone) names its own."""
    if references is None:
        references = REFERENCES + ((config.gain_against,) if config.gain_against not in REFERENCES else ())
    names = list(references) + [m for m in config.methods if m not in references]
    variants: list[MethodVariant] = []
    for name in names:
        cls = METHODS.get(name)
        options = dict(config.method_options.get(name, {}))
        strategies = config.label_strategy if "label_strategy" in cls.Options.model_fields else []
        if strategies and "label_strategy" not in options and len(strategies) > 1:
            variants += [MethodVariant(f"{name}[{s}]", name, {**options, "label_strategy": s}) for s in strategies]
        else:
            if strategies and "label_strategy" not in options:
                options["label_strategy"] = strategies[0]
            variants.append(MethodVariant(name, name, options))
    for variant in variants:  # fail on a bad option now, before any work or output
        METHODS.get(variant.method)(**variant.options)
    return variants


def load_pool_catalog(config: RunConfig) -> Catalog:
    catalog = load_catalog(config.principles_dir, config.personas_dir)
    if config.pool > catalog.largest_pool:
        raise ConfigError(f"pool {config.pool} is larger than the catalog's largest pool ({catalog.largest_pool})")
    if config.n_attr > config.pool:
        raise ConfigError(f"n_attr {config.n_attr} exceeds the pool size {config.pool}")
    return catalog.with_pool(config.pool)


def load_population(config: RunConfig, catalog: Catalog, writer: HistoryWriter | None = None) -> Population:
    if config.conversations_file is not None:
        return import_reference_conversations(config.conversations_file, catalog, config.history_len,
                                              config.test_conversations_file)
    prompts, test_prompts = prompt_pools(config)
    population = build_population(
        catalog, prompts, writer or SimHistoryWriter(catalog, config.writer), config.users, config.n_attr,
        drawn_history_len(config), config.data_seed, balanced=config.balanced_population, test_prompts=test_prompts,
        test_users=round(config.users * config.test_fraction) if test_prompts is not None else 0,
    )
    return population if config.drawn_history_len is None else keep_history(population, config.history_len)


def drawn_history_len(config: RunConfig) -> int:
    return config.history_len if config.drawn_history_len is None else config.drawn_history_len


def prompt_pools(config: RunConfig) -> tuple[list[NeutralPrompt], list[NeutralPrompt] | None]:
    """The prompts of training-side users, and of test users where those must be disjoint (a test
    prompt file of their own, or a share of the one set)."""
    prompts = load_prompts(config.prompts_file)
    if config.test_prompts_file is not None:
        return prompts, load_prompts(config.test_prompts_file)
    if config.disjoint_test_prompts:
        return split_prompt_pools(prompts, config.test_fraction, drawn_history_len(config) + 1, config.data_seed)
    return prompts, None


def prepare(config: RunConfig, writer: HistoryWriter | None = None) -> tuple[Catalog, Population]:
    """Load and validate every input; raises ApmError before anything is computed or written."""
    check_roles(config)
    catalog = load_pool_catalog(config)
    population = load_population(config, catalog, writer)
    build_worlds(config, catalog, population)  # e.g. more train_users than a world has
    return catalog, population


def build_worlds(config: RunConfig, catalog: Catalog, population: Population) -> list[World]:
    """One world (a draw of C, its targets and split) per world seed of the config."""
    return [
        build_world(
            population, catalog, world_seed, config.mapping, config.n_perm, config.max_targets,
            config.validation_fraction, config.test_fraction,
            split_seed=world_seed if config.split_per_world else config.data_seed, train_users=config.train_users,
        )
        for world_seed in config.worlds
    ]


def apply_control(world: World, config: RunConfig) -> dict[str, tuple[str, ...]]:
    """The histories methods are shown: real, empty (no-history) or permuted across users."""
    ids = sorted(world.users)
    histories = {uid: tuple(world.users[uid].history) for uid in ids}
    if config.control == "no-history":
        return {uid: () for uid in ids}
    if config.control == "shuffled-history":
        order = np.random.default_rng([world.seed, 0x5F]).permutation(len(ids))
        return {uid: histories[ids[j]] for uid, j in zip(ids, order)}
    return histories


class Stages:
    """Stage announcements for the progress display, plus detail lines within the current stage."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.started = 0
        self.current = ""

    def __call__(self, stage: str) -> None:
        self.current = stage
        if self.progress is not None:
            self.progress(stage, min(self.started, self.total), self.total)
        self.started += 1

    def detail(self, text: str) -> None:
        """E.g. a training step: shown under the current stage without advancing the count."""
        if self.progress is not None:
            self.progress(f"{self.current}: {text}", min(max(self.started - 1, 0), self.total), self.total)


class Stopwatch:
    """Cost per stage: seconds, call counts, tokens, and the cache hits/misses during the stage."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.costs: dict[str, dict[str, float]] = {}
        self._started = 0.0
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._started = time.perf_counter()
        self._before = self.engines.counters()

    def stop(self, stage: str, **counts: float) -> None:
        entry = self.costs.setdefault(stage, {"seconds": 0.0})
        entry["seconds"] += time.perf_counter() - self._started
        after = self.engines.counters()
        deltas = {k: v - self._before.get(k, 0.0) for k, v in after.items()}
        self.count(stage, **counts, **{k: v for k, v in deltas.items() if v})

    def count(self, stage: str, **counts: float) -> None:
        """Counts without time, e.g. one method's share of a phase that ran as one batch."""
        entry = self.costs.setdefault(stage, {})
        for key, value in counts.items():
            entry[key] = entry.get(key, 0.0) + value

    def rate(self, stage: str, counted: str) -> None:
        entry = self.costs[stage]
        entry[f"{counted}_per_second"] = entry.get(counted, 0.0) / entry["seconds"] if entry.get("seconds") else 0.0


def run_benchmark(
    config: RunConfig, progress: Progress | None = None, embedder: HistoryEmbedder | None = None
) -> RunResult:
    """Run every world; pass an `embedder` to reuse its loaded model and memo across runs."""
    check_memory(config)
    check_output_dir(config.out, "output folder (--out)")  # found now, not after the run is computed
    variants = plan_methods(config)
    say = Stages(progress, total=len(config.worlds) * len(variants) + 6)
    say("population")
    catalog = load_pool_catalog(config)
    if config.conversations_file is None:
        prompt_pools(config)  # a bad prompt file fails before any engine starts
    if config.train_users is not None:  # so does a cap larger than a world's training set
        build_worlds(config, catalog, load_population(config, catalog))
    engines = build_engines(config, catalog, embedder)
    engines.report_retries(say.detail)
    try:
        population = load_population(config, catalog, engines.history_writer)
        return _run_all(config, variants, catalog, population, engines, say)
    finally:
        engines.close()


def _run_all(
    config: RunConfig,
    variants: list[MethodVariant],
    catalog: Catalog,
    population: Population,
    engines: Engines,
    say: Stages,
) -> RunResult:
    """The run in phases that each need one role, so every engine gets the largest batches and is
    loaded as few times as possible: candidates (candidate writer), their ratings (judge), the fits
    (the generator or judge only where a method needs them), every test generation of every world
    and method in one batch (generator), then all their ratings (judge)."""
    watch = Stopwatch(engines)
    store = artifact_store(config)
    training: list[dict[str, Any]] = []
    label_training: list[tuple[str, str, float, int]] = []
    worlds = build_worlds(config, catalog, population)
    with_test_users = any(METHODS.get(v.method).needs_test_feedback for v in variants)
    bank = rated_candidates(config, catalog, engines, worlds, watch, say, with_test_users)
    planned: list[Planned] = []
    for world in worlds:
        context, test_users = fit_context(world, config, catalog, engines, bank, say, store)
        test_feedback = FeedbackOracle(bank, {u.id: world.targets[u.id] for u in test_users}) if with_test_users else None
        for variant in variants:
            say(f"world {world.seed}: {variant.label}")
            planned.append(_fit(variant, world, context, test_users, config, watch, training, test_feedback, label_training))
    generations = generate_all(planned, engines, watch, say)
    ratings = _rate_all(planned, generations, engines, watch, say)
    samples = pd.concat([_world_frame(planned, generations, ratings, world.seed) for world in worlds], ignore_index=True)
    say("metrics")
    metrics = compute_metrics(samples, config.bootstrap_seed, config.bootstrap_resamples, oracle_method=config.gain_against)
    watch.costs["candidates"].update(generation_calls=float(bank.generation_calls), rating_calls=float(bank.rating_calls))
    watch.costs["engines"] = engines.budget.snapshot()
    # users the history writer failed on are discarded before any world is built: counted here
    watch.costs["population"] = {"users": float(len(population.users)),
                                 "discarded_users": float(population.discarded_users)}
    watch.costs["embedding"] = {"texts_encoded": float(engines.embedder.encoded_texts), **{
        f"embedding_{k}": float(v) for k, v in engines.embedder.stats.snapshot().items()}}
    say("done")
    diagnostics = label_diagnostics(samples, label_training)
    members = {"principles": catalog.principle_ids, "attributes": catalog.attribute_ids}
    return RunResult(config, samples, metrics, watch.costs, population.source, training, store, diagnostics, members)


@dataclass
class Planned:
    """One (world, method): its test users and prompts and what the method sends for each."""

    world: World
    variant: MethodVariant
    users: list[UserView]
    prompts: list[str]
    personalizations: list[Any]
    requests: list[GenerationRequest]
    #: the judge's seed for these responses: the world's, or one for all worlds (a shared baseline)
    rating_seed: int = 0


def rated_candidates(
    config: RunConfig, catalog: Catalog, engines: Engines, worlds: list[World], watch: Stopwatch, say: Stages,
    with_test_users: bool = False,
) -> CandidateBank:
    """Phases 2 and 3: candidates for the training-side users of every world, then their ratings;
    for the test users too where the paper's oracle runs (it routes each by their own candidates)."""
    bank = CandidateBank(engines.candidate_writer, engines.judge, catalog, seed=config.data_seed, max_tokens=config.max_tokens,
                         texts=config.instruction_texts)

    def rated(world: World) -> list[str]:
        return world.split.train + world.split.validation + (world.split.test if with_test_users else [])

    fit_users = {uid: world for world in worlds for uid in rated(world)}
    say(f"candidates for {len(fit_users)} users of {len(worlds)} world(s)")
    watch.start()
    bank.ensure({uid: world.users[uid].prompt for uid, world in fit_users.items()})
    say("ratings of the candidates")
    bank.ensure_ratings((uid, target.principle) for world in worlds for uid in rated(world) for target in world.targets[uid])
    watch.stop("candidates")
    return bank


def fit_context(
    world: World,
    config: RunConfig,
    catalog: Catalog,
    engines: Engines,
    bank: CandidateBank,
    say: Stages,
    store: ArtifactStore,
) -> tuple[FitContext, list[UserView]]:
    histories = apply_control(world, config)
    fit_ids = world.split.train + world.split.validation
    feedback = FeedbackOracle(bank, {uid: world.targets[uid] for uid in fit_ids})

    def fit_user(uid: str) -> FitUser:
        return FitUser(id=uid, history=histories[uid], prompt=world.users[uid].prompt)

    context = FitContext(
        train_users=[fit_user(u) for u in world.split.train],
        validation_users=[fit_user(u) for u in world.split.validation],
        feedback=feedback,
        generator=engines.generator,
        embedder=engines.embedder,
        principles=list(catalog.principles),
        seed=world.seed,
        artifacts=store,
        report=say.detail,
        budget=ContextBudget(engines.generator, config.max_tokens),
        texts=config.instruction_texts,
        trainer=engines.trainer,
    )
    return context, [UserView(id=uid, history=histories[uid]) for uid in world.split.test]


def fit_method(
    variant: MethodVariant,
    world: World,
    context: FitContext,
    test_users: list[UserView],
    test_feedback: FeedbackOracle | None = None,
) -> Personalizer:
    """A method fitted on one world as every run fits it; evaluation-only bounds are handed the
    targets (or feedback) of exactly these test users and nothing else."""
    method: Personalizer = METHODS.get(variant.method)(**variant.options)
    if method.evaluation_only:
        method.reveal_targets({u.id: world.targets[u.id] for u in test_users})
    if method.needs_test_feedback and test_feedback is not None:
        method.reveal_feedback(test_feedback)
    method.fit(context)
    return method


def _fit(
    variant: MethodVariant,
    world: World,
    context: FitContext,
    test_users: list[UserView],
    config: RunConfig,
    watch: Stopwatch,
    training: list[dict[str, Any]],
    test_feedback: FeedbackOracle | None = None,
    label_training: list[tuple[str, str, float, int]] | None = None,
) -> Planned:
    """Phase 4 for one (world, method): fit, then turn every test user's prompt into a request."""
    calls_before = context.feedback.calls
    watch.start()
    method = fit_method(variant, world, context, test_users, test_feedback)
    prompts = [world.users[u.id].prompt for u in test_users]
    personalizations = method.personalize_many(test_users, prompts)
    records = method.training_records()
    watch.stop(f"fit:{variant.label}", feedback_calls=context.feedback.calls - calls_before,
               **{k: sum(r.cost()[k] for r in records) for k in ("training_steps", "training_examples", "training_seconds") if records})
    training += [{"world": world.seed, "method": variant.label, **dataclasses.asdict(r)} for r in records]
    derived = method.training_labels()
    if derived and label_training is not None:  # evaluation only: targets are read after the fit
        label_training.append((variant.label, str(world.seed), *training_label_accuracy(derived, world.targets)))
    # the baseline does not depend on C: shared, it is one request per test user whatever the world,
    # so the cache generates and judges it once and every world reuses it (the authors' protocol)
    shared = config.shared_baseline and variant.method == BASELINE
    requests = [
        GenerationRequest(
            messages=p.messages,
            seed=stable_seed("evaluation", u.id) if shared else stable_seed("evaluation", world.seed, u.id),
            params=SamplingParams(temperature=config.temperature if p.temperature is None else p.temperature,
                                  max_tokens=config.max_tokens),
            adapter=p.adapter,
            soft_prompt=p.soft_prompt,
        )
        for u, p in zip(test_users, personalizations)
    ]
    return Planned(world, variant, test_users, prompts, personalizations, requests, 0 if shared else world.seed)


def generate_all(planned: list[Planned], engines: Engines, watch: Stopwatch, say: Stages) -> list[list[Any]]:
    """Phase 5: every method's test generations of every world, one batch for the generator."""
    requests = [r for plan in planned for r in plan.requests]
    say(f"generation: {len(requests)} responses")
    watch.start()
    if engines.generator.capabilities.batch_invariant:
        flat = engines.generator.generate(requests)
    else:
        flat = [g for plan in planned for g in engines.generator.generate(plan.requests)]
    watch.stop("phase:generation", requests=len(requests), prompt_tokens=sum(g.prompt_tokens for g in flat),
               completion_tokens=sum(g.completion_tokens for g in flat))
    watch.rate("phase:generation", "completion_tokens")
    generations, start = [], 0
    for plan in planned:
        mine = flat[start : start + len(plan.requests)]
        start += len(plan.requests)
        generations.append(mine)
        watch.count(f"generate:{plan.variant.label}", calls=len(mine), prompt_tokens=sum(g.prompt_tokens for g in mine),
                    completion_tokens=sum(g.completion_tokens for g in mine))
    return generations


def _rate_all(
    planned: list[Planned], generations: list[list[Any]], engines: Engines, watch: Stopwatch, say: Stages
) -> list[list[Any]]:
    """Phase 6: the judge rates every response on each of its user's targets, one batch. A response
    that could not be generated is not judged: its ratings stay empty and the sample counts as a
    failed generation."""
    per_plan = [
        [
            RatingRequest(prompt=prompt, response=g.text, principle=t.principle, seed=plan.rating_seed)
            for u, prompt, g in zip(plan.users, plan.prompts, mine)
            if not g.failed
            for t in plan.world.targets[u.id]
        ]
        for plan, mine in zip(planned, generations)
    ]
    requests = [r for rows in per_plan for r in rows]
    say(f"judging: {len(requests)} ratings")
    watch.start()
    flat = iter(engines.judge.rate(requests))
    watch.stop("phase:judging", requests=len(requests))
    ratings = []
    for plan, mine, rows in zip(planned, generations, per_plan):
        ratings.append([
            Rating(score=None, error=g.error) if g.failed else next(flat)
            for u, g in zip(plan.users, mine)
            for _ in plan.world.targets[u.id]
        ])
        watch.count(f"judge:{plan.variant.label}", calls=len(rows))
    return ratings


def _world_frame(planned: list[Planned], generations: list[list[Any]], ratings: list[list[Any]], seed: int) -> pd.DataFrame:
    """One row per (test user, method) of one world, with the baseline's reward beside each."""
    rows: list[dict[str, Any]] = []
    for plan, mine, rated in zip(planned, generations, ratings):
        if plan.world.seed != seed:
            continue
        remaining = iter(rated)
        for user, prompt, personalization, generation in zip(plan.users, plan.prompts, plan.personalizations, mine):
            targets = plan.world.targets[user.id]
            user_ratings = [next(remaining) for _ in targets]
            reward = weighted_reward(targets, user_ratings) if not generation.failed else None
            system = next((m.content for m in personalization.messages if m.role == "system"), "")
            rows.append(
                {
                    "world": plan.world.seed,
                    "user_id": user.id,
                    "method": plan.variant.label,
                    "prompt": prompt,
                    "system_prompt": system,
                    "history_tokens": sum(len(m.split()) for m in user.history),
                    "summary": personalization.notes.get("summary"),
                    "routed_to": personalization.notes.get("routed_to"),
                    "response": generation.text,
                    "generation_error": generation.error,
                    "context_trimmed": int(personalization.notes.get("context_trimmed", 0)),
                    "targets": [t.model_dump() for t in targets],
                    "ratings": [r.score for r in user_ratings],
                    "failed_ratings": reward.failed_ratings if reward is not None else 0,
                    "reward": reward.value if reward is not None else None,
                }
            )
    frame = pd.DataFrame(rows)
    baseline = frame[frame["method"] == BASELINE].set_index("user_id")["reward"]
    frame["baseline_reward"] = frame["user_id"].map(baseline)
    return frame
