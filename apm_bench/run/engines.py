"""The engines of one run, built from its config: generator, candidate writer, history writer,
judge and embedder, all behind the persistent cache. Created per run and closed after it; there
are no module-level engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apm_bench.backends import load_backend
from apm_bench.backends.base import Backend
from apm_bench.backends.cached import CachedBackend
from apm_bench.backends.history_writer import LLMHistoryWriter
from apm_bench.cache import CacheStats, CallCache
from apm_bench.judging.judge import CachedJudge, Judge
from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
from apm_bench.judging.sim_judge import SimJudge
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import SIM_JUDGE, RunConfig
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

    def counters(self) -> dict[str, float]:
        """Cache hits and misses so far, per kind of call (the runner takes per-stage differences)."""
        counts: dict[str, float] = {}
        for prefix, engine in (("generation", self.generator), ("judge", self.judge)):
            stats = getattr(engine, "stats", None)
            if isinstance(stats, CacheStats):
                counts.update({f"{prefix}_{k}": float(v) for k, v in stats.snapshot().items()})
        return counts

    def close(self) -> None:
        for backend in {id(b): b for b in (self.generator, self.candidate_writer)}.values():
            backend.close()
        if self.cache is not None:
            self.cache.close()


def _options(url: str | None) -> dict[str, Any]:
    return {"base_url": url} if url else {}


def build_engines(config: RunConfig, catalog: Catalog, embedder: HistoryEmbedder | None = None) -> Engines:
    cache = CallCache(config.cache) if config.cache is not None else None

    def backend(model: str, engine: str | None, url: str | None) -> Backend:
        built = load_backend(model, catalog, backend=engine, options=_options(url))
        return CachedBackend(built, cache) if cache is not None else built

    generator = backend(config.model, config.backend, config.base_url)
    same_writer = (config.candidate_model, config.candidate_backend) == (config.model, config.backend)
    candidate_writer = generator if same_writer else backend(config.candidate_model, config.candidate_backend, None)
    judge: Judge
    if config.judge_model == SIM_JUDGE and config.judge_backend is None:
        judge = SimJudge(catalog.principles, config.judge)
    else:
        judge_config = LLMJudgeConfig(
            weighted=config.judge_weighted,
            max_tokens=config.judge_max_tokens,
            reasoning_effort=config.judge_reasoning_effort,
        )
        judge = LLMJudge(backend(config.judge_model, config.judge_backend, config.judge_url), catalog.principles, judge_config)
    if cache is not None:
        judge = CachedJudge(judge, cache)
    history_writer: HistoryWriter
    if config.writer_model == "sim":
        history_writer = SimHistoryWriter(catalog, config.writer)
    else:
        history_writer = LLMHistoryWriter(backend(config.writer_model, config.writer_backend, None), catalog)
    if embedder is None:
        embedder = HistoryEmbedder(cache=cache)
    return Engines(generator, candidate_writer, judge, history_writer, embedder, cache)
