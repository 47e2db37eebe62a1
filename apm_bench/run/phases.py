"""The phases of a run, each needing one role, so every engine gets the largest batches and is loaded
as few times as possible: candidates and their ratings, the fits (with every test user's request),
all generations, all ratings, and the table of samples. Progress and cost per stage are kept here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from apm_bench.backends.base import GenerationRequest, SamplingParams
from apm_bench.judging.candidates import CandidateBank
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.judging.judge import Rating, RatingRequest
from apm_bench.judging.label_diagnostics import training_label_accuracy
from apm_bench.judging.reward import weighted_reward
from apm_bench.methods import METHODS, FitContext, FitUser, Personalizer, UserView
from apm_bench.methods.artifacts import ArtifactStore
from apm_bench.methods.context_budget import ContextBudget
from apm_bench.run.config import RunConfig
from apm_bench.run.setup import BASELINE, MethodVariant, apply_control
from apm_bench.run.engines import Engines
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Catalog
from apm_bench.world.world import World

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, stages_done, stages_total) when a stage starts, and once at the end."""


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


def prefetch_history_vectors(variants: list[MethodVariant], worlds: list[World], config: RunConfig, engines: Engines) -> None:
    """Phase 1½: where a method will embed histories, φ starts on every history it can be shown, in
    the background, so that encoding overlaps the Python work of writing and rating candidates."""
    if not any(METHODS.get(v.method)(**v.options).embeds_histories() for v in variants):
        return
    messages = []
    for world in worlds:
        histories = apply_control(world, config)
        messages += [m for uid in world.split.train + world.split.validation + world.split.test for m in histories[uid]]
    engines.embedder.prefetch(messages)


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


def fit_and_plan(
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


def rate_all(
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


def adapter_label(personalization: Any) -> str | None:
    """What besides messages shaped the answer, named for a reader of the samples."""
    if personalization.adapter is not None:
        return str(personalization.adapter.name)
    if personalization.soft_prompt is not None:
        tokens = len(personalization.soft_prompt.embeddings)
        return f"soft prompt ({tokens} token{'s' if tokens != 1 else ''})"
    return None


def test_users_frame(planned: list[Planned]) -> pd.DataFrame:
    """One row per (world, test user): the history methods were shown and the hidden attributes,
    so a reader can see what a method had to go on (users.parquet)."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    for plan in planned:
        for user in plan.users:
            if (plan.world.seed, user.id) in seen:
                continue
            seen.add((plan.world.seed, user.id))
            hidden = plan.world.users.get(user.id)
            rows.append({
                "world": plan.world.seed,
                "user_id": user.id,
                "history": list(user.history),
                "attributes": [a.model_dump() for a in hidden.attributes] if hidden is not None else [],
            })
    return pd.DataFrame(rows, columns=["world", "user_id", "history", "attributes"])


def world_frame(planned: list[Planned], generations: list[list[Any]], ratings: list[list[Any]], seed: int) -> pd.DataFrame:
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
            context = [{"role": m.role, "content": m.content} for m in personalization.messages[:-1] if m.role != "system"]
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
                    "context": context,
                    "adapter": adapter_label(personalization),
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
