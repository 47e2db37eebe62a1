"""The engines of one run, built from its config: generator, candidate writer, history writer,
judge and embedder, all behind the persistent cache. Created per run and closed after it; there
are no module-level engines. Roles on the same model, engine and server share one engine, and
engines that hold device memory load when first used, at most `engine_budget` at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apm_bench.backends import load_backend, resolve_model
from apm_bench.backends.base import Backend
from apm_bench.backends.budget import EngineBudget, LazyEngine
from apm_bench.backends.cached import CachedBackend
from apm_bench.backends.history_writer import LLMHistoryWriter
from apm_bench.cache import CacheStats, CallCache
from apm_bench.errors import ConfigError
from apm_bench.judging.judge import CachedJudge, Judge
from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
from apm_bench.judging.sim_judge import SimJudge
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import SIM_JUDGE, SIM_WRITER, RunConfig
from apm_bench.sim.writer import SimHistoryWriter
from apm_bench.world.catalog import Catalog
from apm_bench.world.histories import HistoryWriter


@dataclass
class Engines:
    generator: Backend
    candidate_writer: Backend
    judge: Judge
    history_writer: HistoryWriter
    embedder: HistoryEmbedder
    cache: CallCache | None
    #: every distinct engine of the run (roles on the same engine share one)
    backends: list[Backend] = field(default_factory=list)
    budget: EngineBudget = field(default_factory=EngineBudget)
    #: where the generator cannot train: its model in an engine that can, built when a method trains
    trainer: LazyEngine | None = None

    def counters(self) -> dict[str, float]:
        """Cache hits and misses so far, per kind of call (the runner takes per-stage differences)."""
        counts: dict[str, float] = {}
        for prefix, engine in (("generation", self.generator), ("judge", self.judge)):
            stats = getattr(engine, "stats", None)
            if isinstance(stats, CacheStats):
                counts.update({f"{prefix}_{k}": float(v) for k, v in stats.snapshot().items()})
        return counts

    def report_retries(self, report: Callable[[str], None]) -> None:
        """Engines that retry over a network (openai) announce each retry through `report`."""
        for backend in {id(b): b for b in (self.generator, self.candidate_writer, *self.backends)}.values():
            hook = getattr(backend, "set_reporter", None)
            if callable(hook):
                hook(report)

    def close(self) -> None:
        for backend in {id(b): b for b in (self.generator, self.candidate_writer, *self.backends)}.values():
            backend.close()
        if self.trainer is not None:
            self.trainer.close()
        if self.cache is not None:
            self.cache.close()


@dataclass(frozen=True)
class RoleEngine:
    """Which engine serves a role: roles with equal RoleEngines share one engine."""

    model: str
    backend: str | None
    url: str | None
    #: the role's engine options as canonical JSON (hashable; equal options compare equal)
    options: str = "{}"

    def engine_options(self) -> dict[str, Any]:
        return {**json.loads(self.options), **({"base_url": self.url} if self.url else {})}


def _resolved(model: str, backend: str | None, url: str | None, options: dict[str, Any]) -> RoleEngine:
    """With the engine an alias or a path implies filled in, so equal engines compare equal."""
    if model in (SIM_WRITER, SIM_JUDGE) and backend is None:
        return RoleEngine(model, None, url)  # the in-process simulator's writer and judge
    return RoleEngine(model, resolve_model(model, backend).backend, url, json.dumps(options, sort_keys=True))


#: the role names of the `engine_options` config field
ROLE_KEYS = {"generator": "generator", "candidate writer": "candidate_writer", "history writer": "history_writer",
             "judge": "judge"}


def role_engines(config: RunConfig) -> dict[str, RoleEngine]:
    """The run's four roles (the in-process simulator's writer and judge included, by their names).
    A role without engine options of its own takes those of a role on the same model, engine and
    server (the generator's first), so setting them once keeps such roles on one engine."""
    places = {
        "generator": (config.model, config.backend, config.base_url),
        "candidate writer": (config.candidate_model, config.candidate_backend, config.candidate_url),
        "history writer": (config.writer_model, config.writer_backend, config.writer_url),
        "judge": (config.judge_model, config.judge_backend, config.judge_url),
    }
    bare = {role: _resolved(*place, {}) for role, place in places.items()}
    given = {role: config.engine_options[key] for role, key in ROLE_KEYS.items() if key in config.engine_options}

    def options(role: str) -> dict[str, Any]:
        if role in given:
            return given[role]
        return next((given[other] for other in ("generator", "judge", "candidate writer", "history writer")
                     if other in given and bare[other] == bare[role]), {})

    return {role: _resolved(*place, options(role)) for role, place in places.items()}


#: the option that sets each role, for the message that asks for it
ROLE_OPTIONS = {"candidate writer": "--candidate-model", "history writer": "--writer-model", "judge": "--judge-model"}


def is_simulated(role: str, engine: RoleEngine) -> bool:
    """The simulator plays this role: a sim-* model (in process or served over HTTP), the phrase-bank
    writer or the feature-measuring judge."""
    if role == "history writer" and engine.model == SIM_WRITER:
        return True
    if role == "judge" and engine.model == SIM_JUDGE:
        return True
    return resolve_model(engine.model, engine.backend).sim is not None  # unknown names fail here, with did-you-mean


def fully_simulated(config: RunConfig) -> bool:
    """Every role of the run is played by the simulator: it loads no model anywhere."""
    return all(is_simulated(role, engine) for role, engine in role_engines(config).items())


def check_roles(config: RunConfig) -> None:
    """A real generator is never paired silently with simulated roles: the simulator's judge reads
    the simulator's marker phrases, so on real text its ratings mean nothing."""
    roles = role_engines(config)
    if is_simulated("generator", roles["generator"]) or config.allow_simulated_roles:
        return
    if resolve_model(config.model, config.backend).sim_language:
        return  # apm-tiny writes the simulator's markers: sim-judge rates its answers meaningfully
    simulated = [role for role in ROLE_OPTIONS if is_simulated(role, roles[role])]
    if simulated:
        options = ", ".join(ROLE_OPTIONS[r] for r in simulated)
        raise ConfigError(
            f"the generator {config.model} is a real model but the {', '.join(simulated)} would be simulated: "
            f"set {options}, or --roles same (every role on the generator) or --roles paper, "
            "or pass --allow-simulated-roles to mean it"
        )


#: wraps each engine of a run as it is built (e.g. to record every request and answer)
EngineWrapper = Callable[[Backend], Backend]


def build_engines(config: RunConfig, catalog: Catalog, embedder: HistoryEmbedder | None = None,
                  wrap: EngineWrapper | None = None) -> Engines:
    """One engine per distinct (model, backend, server) among the roles, loaded on first use under
    the run's engine budget, each behind the call cache (and inside `wrap`, where one is given)."""
    check_roles(config)
    cache = CallCache(config.cache) if config.cache is not None else None
    budget = EngineBudget(config.engine_budget)
    built: dict[RoleEngine, Backend] = {}

    def backend(engine: RoleEngine) -> Backend:
        if engine not in built:
            inner = load_backend(engine.model, catalog, backend=engine.backend, options=engine.engine_options())
            inner.bind_budget(budget)
            if wrap is not None:
                inner = wrap(inner)
            built[engine] = CachedBackend(inner, cache) if cache is not None else inner
        return built[engine]

    roles = role_engines(config)
    generator = backend(roles["generator"])
    candidate_writer = backend(roles["candidate writer"])
    judge: Judge
    if config.judge_model == SIM_JUDGE and config.judge_backend is None:
        judge = SimJudge(catalog.principles, config.judge)
    else:
        judge_config = LLMJudgeConfig(
            weighted=config.judge_weighted,
            max_tokens=config.judge_max_tokens,
            temperature=config.judge_temperature,
            reasoning_effort=config.judge_reasoning_effort,
            prompt=config.judge_prompt,
            scale=config.judge_scale,
            parse=config.judge_parse,
            top_p=config.judge_top_p,
            retries=config.judge_retries,
            forced_answer=config.judge_forced_answer,
        )
        judge = LLMJudge(backend(roles["judge"]), catalog.principles, judge_config)
    if cache is not None:
        judge = CachedJudge(judge, cache)
    history_writer: HistoryWriter
    if config.writer_model == SIM_WRITER:
        history_writer = SimHistoryWriter(catalog, config.writer)
    else:
        history_writer = LLMHistoryWriter(backend(roles["history writer"]), catalog, temperature=config.writer_temperature,
                                          max_tokens=config.writer_max_tokens, prompt=config.writer_prompt,
                                          discard_truncated=config.writer_discard_truncated)
    if embedder is None:
        embedder = HistoryEmbedder(cache=cache, backend=config.embedder)
    twin = getattr(generator, "training_twin", None)
    trainer = LazyEngine(f"{config.model} (training)", twin, budget) if twin is not None else None
    return Engines(generator, candidate_writer, judge, history_writer, embedder, cache, list(built.values()), budget,
                   trainer)
