"""The robustness check: does personalization cost correctness or fairness?

The APM authors' check, in apm-bench's terms. Methods are fitted exactly as `apm run` fits them
(the same config, population, world, training users and feedback, through the runner's own
phases) on one world. Then every multiple-choice question is paired with a test user (a seeded
order of the world's test users, cycled), each method personalizes the question for that user
(system prompt, examples, adapter, soft prompt: whatever it sends for a real prompt), and the
generator answers. Accuracy per benchmark and method is compared with the baseline's, which
sends the question alone (the authors' unpersonalized model), on the same questions. Every method
answers a question with the same sampling seed, so the only difference is the personalization.

The simulator cannot answer knowledge questions, so the generator must be a real model. The
candidate writer, history writer and judge only serve the fits and may stay simulated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apm_bench.backends.base import GenerationRequest, SamplingParams
from apm_bench.errors import ConfigError, first_error
from apm_bench.judging.accuracy import AccuracyMetrics, CategoryAccuracy, accuracy_metrics, category_accuracy, parse_letter
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.methods import METHODS, UserView
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.engines import Engines, build_engines, is_simulated, role_engines
from apm_bench.run.phases import (
    Planned,
    Progress,
    Stages,
    Stopwatch,
    fit_context,
    fit_method,
    generate_all,
    rated_candidates,
)
from apm_bench.run.setup import (
    BASELINE,
    MethodVariant,
    artifact_store,
    build_worlds,
    load_pool_catalog,
    load_population,
    plan_methods,
    prompt_pools,
)
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Catalog
from apm_bench.world.histories import Population
from apm_bench.world.robustness_sets import Benchmark, Question, format_question, load_question_set


class RobustnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig
    #: where each benchmark's questions come from: a file, a folder or a hub id
    sets: dict[Benchmark, str] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1, description="questions per benchmark (None: all)")
    seed: int = Field(default=42, description="question order, TruthfulQA's choice order and user pairing")
    world: int = Field(default=0, description="the world seed the methods are fitted on")
    out: Path = Path("results/robustness")

    def fit_config(self) -> RunConfig:
        """The run config of the fits: one world; simulated writers and judge are fine, since they
        only serve the fits and never grade an answer."""
        return self.run.model_copy(update={"worlds": [self.world], "allow_simulated_roles": True})


def robustness_config(run: RunConfig, sets: dict[str, str | None], **options: Any) -> RobustnessConfig:
    """From the CLI: the sets given (all three from their hub ids where none is), and options
    left unset (None) at their defaults."""
    from apm_bench.world.robustness_sets import HUB_SOURCES

    chosen = {b: s for b, s in sets.items() if s is not None} or {b: h.repo for b, h in HUB_SOURCES.items()}
    try:
        return RobustnessConfig(run=run, sets=chosen, **{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid robustness option {first_error(exc)}") from None


@dataclass
class RobustnessResult:
    config: RobustnessConfig
    #: one row per question and method
    rows: pd.DataFrame
    metrics: list[AccuracyMetrics]
    categories: list[CategoryAccuracy]
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    training: list[dict[str, Any]] = field(default_factory=list)


def check_generator(run: RunConfig) -> None:
    if is_simulated("generator", role_engines(run)["generator"]):
        raise ConfigError(
            f"robustness needs a real generator: the simulator ({run.model}) cannot answer knowledge questions; "
            "set --model to a real model (with --backend hf, vllm or openai)"
        )


def prepare_robustness(config: RobustnessConfig) -> tuple[list[MethodVariant], list[Question]]:
    """Validate the generator and the methods and load every question, before any engine starts."""
    check_generator(config.run)
    variants = plan_methods(config.fit_config(), references=(BASELINE,))
    questions = [q for benchmark, source in config.sets.items()
                 for q in load_question_set(benchmark, source, config.limit, config.seed)]
    return variants, questions


def run_robustness(config: RobustnessConfig, progress: Progress | None = None,
                   embedder: HistoryEmbedder | None = None) -> RobustnessResult:
    variants, questions = prepare_robustness(config)
    run = config.fit_config()
    say = Stages(progress, total=len(variants) + 6)
    say("population")
    catalog = load_pool_catalog(run)
    if run.conversations_file is None:
        prompt_pools(run)  # a bad prompt file fails before any engine starts
    engines = build_engines(run, catalog, embedder)
    try:
        population = load_population(run, catalog, engines.history_writer)
        return _evaluate(config, variants, questions, catalog, population, engines, say)
    finally:
        engines.close()


def pair_users(users: list[UserView], count: int, seed: int) -> list[UserView]:
    """The test user whose history goes with each question: a seeded order of the users, cycled."""
    if not users:
        raise ConfigError("the world has no test users to pair the questions with (raise --users)")
    order = np.random.default_rng([seed, 0x0B5]).permutation(len(users))
    return [users[order[i % len(users)]] for i in range(count)]


def _evaluate(
    config: RobustnessConfig,
    variants: list[MethodVariant],
    questions: list[Question],
    catalog: Catalog,
    population: Population,
    engines: Engines,
    say: Stages,
) -> RobustnessResult:
    run = config.fit_config()
    watch = Stopwatch(engines)
    training: list[dict[str, Any]] = []
    world = build_worlds(run, catalog, population)[0]
    with_test_users = any(METHODS.get(v.method).needs_test_feedback for v in variants)
    bank = rated_candidates(run, catalog, engines, [world], watch, say, with_test_users)
    context, test_users = fit_context(world, run, catalog, engines, bank, say, artifact_store(run))
    test_feedback = FeedbackOracle(bank, {u.id: world.targets[u.id] for u in test_users}) if with_test_users else None
    users = pair_users(test_users, len(questions), config.seed)
    prompts = [format_question(q) for q in questions]
    params = SamplingParams(temperature=run.temperature, max_tokens=run.max_tokens)
    planned = []
    for variant in variants:
        say(f"world {world.seed}: {variant.label}")
        watch.start()
        method = fit_method(variant, world, context, test_users, test_feedback)
        personalizations = method.personalize_many(users, prompts)
        watch.stop(f"fit:{variant.label}")
        training += [{"world": world.seed, "method": variant.label, **dataclasses.asdict(r)}
                     for r in method.training_records()]
        requests = [GenerationRequest(messages=p.messages, seed=stable_seed("robustness", q.id), params=params,
                                      adapter=p.adapter, soft_prompt=p.soft_prompt)
                    for q, p in zip(questions, personalizations)]
        planned.append(Planned(world, variant, users, prompts, personalizations, requests))
    generations = generate_all(planned, engines, watch, say)
    say("grading")
    rows = answer_rows(questions, planned, generations)
    metrics = accuracy_metrics(rows, run.bootstrap_seed, run.bootstrap_resamples, baseline=BASELINE)
    watch.costs["engines"] = engines.budget.snapshot()
    say("done")
    return RobustnessResult(config, rows, metrics, category_accuracy(rows), watch.costs, training)


def answer_rows(questions: list[Question], planned: list[Planned], generations: list[list[Any]]) -> pd.DataFrame:
    """One row per (question, method): what was sent, the reply, the letter read and whether it is right."""
    rows = []
    for plan, replies in zip(planned, generations):
        for question, user, prompt, personalization, reply in zip(
                questions, plan.users, plan.prompts, plan.personalizations, replies):
            letter = None if reply.failed else parse_letter(reply.text, question.letters)
            rows.append({
                "benchmark": question.benchmark,
                "question_id": question.id,
                "category": question.category,
                "method": plan.variant.label,
                "user_id": user.id,
                "prompt": prompt,
                "system_prompt": next((m.content for m in personalization.messages if m.role == "system"), ""),
                "n_options": len(question.options),
                "answer": question.answer,
                "response": reply.text,
                "parsed": letter,
                "correct": letter == question.answer,
                "unparseable": letter is None and not reply.failed,
                "generation_error": reply.error,
                "context_trimmed": int(personalization.notes.get("context_trimmed", 0)),
            })
    return pd.DataFrame(rows)
