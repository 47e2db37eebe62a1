"""POPI on the simulator: optimised summaries help for the right reasons, and training really runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fit_context import world_zero

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from apm_bench.run.setup import load_pool_catalog, load_population


def _pooled(result, method: str):  # type: ignore[no-untyped-def]
    return next(m for m in result.metrics if m.method == method and m.world == "pooled")


@pytest.fixture(scope="module")
def popi_run(embedder: HistoryEmbedder):  # type: ignore[no-untyped-def]
    """The default config. POPI's tests at the default size are `slow` (`make test-slow`): their claims
    (a gain over untrained summaries, none without a history) are measured at that size, not a smaller one."""
    return run_benchmark(RunConfig(methods=["popi", "popi-untrained"]), embedder=embedder)


@pytest.mark.slow
def test_optimised_summaries_beat_untrained_ones(popi_run) -> None:  # type: ignore[no-untyped-def]
    optimised, untrained = _pooled(popi_run, "popi"), _pooled(popi_run, "popi-untrained")
    assert optimised.delta > 0
    assert optimised.delta > untrained.delta + 0.1
    samples = popi_run.samples
    summaries = samples[samples["method"] == "popi"]["summary"]
    assert summaries.notna().all() and (summaries.str.len() > 10).all()
    baseline = samples[samples["method"] == "baseline"]["summary"]
    assert len(baseline) > 0 and baseline.isna().all()


@pytest.mark.slow
def test_summaries_only_see_the_history(embedder: HistoryEmbedder) -> None:
    """With no history, the summarizer knows nothing about the user: the gain must vanish."""
    result = run_benchmark(RunConfig(methods=["popi"], control="no-history"), embedder=embedder)
    popi = _pooled(result, "popi")
    assert popi.ci_low < 0 < popi.ci_high
    # what the summaries say about attributes is unrelated to the users' real attributes
    rows = result.samples[result.samples["method"] == "popi"]
    catalog = load_pool_catalog(RunConfig())
    names = {a.id: a.name.lower() for a in catalog.attributes}
    _, population = None, load_population(RunConfig(), catalog)
    truth = {u.id: names[u.attributes[0].attribute] for u in population.users}
    mentions = [truth[u] in s for u, s in zip(rows["user_id"], rows["summary"])]
    assert np.mean(mentions) < 0.25


@pytest.mark.slow
def test_summaries_transfer_to_another_generator(popi_run, tmp_path: Path, embedder: HistoryEmbedder) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "samples.parquet"
    popi_run.samples.to_parquet(path)
    reused = run_benchmark(RunConfig(methods=["popi"], model="sim-small",
                                     method_options={"popi": {"summaries_file": str(path)}}), embedder=embedder)
    transferred = _pooled(reused, "popi")
    assert transferred.delta > 0
    original = popi_run.samples[popi_run.samples["method"] == "popi"].set_index(["world", "user_id"])["summary"]
    used = reused.samples[reused.samples["method"] == "popi"].set_index(["world", "user_id"])["summary"]
    assert used.equals(original.loc[used.index])


def test_popi_training_really_ran(embedder: HistoryEmbedder) -> None:
    from apm_bench.methods.popi import Popi

    engines, population, world, context = world_zero(embedder)
    popi = Popi(epochs=10)
    popi.fit(context)
    assert popi.training is not None and popi.training.steps > 0 and popi.adapter is not None
    assert np.mean(popi.training.losses[-5:]) < np.mean(popi.training.losses[:5])
    weights = engines.generator.adapter_parameters(popi.adapter.name)[0]
    assert float(weights.detach().abs().sum()) > 0
    engines.close()


def test_popi_summarizer_is_stored_and_reused_by_a_fresh_engine(embedder: HistoryEmbedder, tmp_path: Path) -> None:
    from apm_bench.methods.base import UserView
    from apm_bench.methods.popi import Popi

    engines, _, world, context = world_zero(embedder, n_train=60, artifacts=tmp_path / "store")
    first = Popi(epochs=5, n_samples=4, responses_per_summary=2)
    first.fit(context)
    assert first.adapter is not None and first.adapter.path is not None and not first.training_records()[0].reused
    users = [UserView(u, tuple(world.users[u].history)) for u in world.split.test[:30]]
    summaries = first.summaries_for(users)
    engines.close()

    fresh_engines, _, _, fresh_context = world_zero(embedder, n_train=60, artifacts=tmp_path / "store")
    again = Popi(epochs=5, n_samples=4, responses_per_summary=2)
    again.fit(fresh_context)  # a new process after a crash: the summarizer comes from disk
    assert again.training_records()[0].reused and again.adapter == first.adapter
    assert again.summaries_for(users) == summaries
    fresh_engines.close()
