"""A whole run over HTTP: `apm serve-sim` serves the simulator, the `openai` backend talks to it with
the official client, and the metrics equal those of the in-process simulator."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from local_server import free_port, start, stop, wait_until_serving

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark

SMALL = dict(methods=["routing"], users=120, worlds=[0], history_len=2, bootstrap_resamples=300, cache=None)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve-sim") / "server.log"
    process = start([sys.executable, "-m", "apm_bench.cli", "serve-sim", "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}/v1"
    wait_until_serving(url, process, log, timeout=60)
    yield url
    stop(process)


def _pooled(result, method: str):  # type: ignore[no-untyped-def]
    return next(m for m in result.metrics if m.method == method and m.world == "pooled")


def test_a_run_over_http_matches_the_in_process_simulator(server_url: str, embedder: HistoryEmbedder) -> None:
    over_http = run_benchmark(RunConfig(
        **SMALL, backend="openai", base_url=server_url,
        judge_model="sim-judge", judge_backend="openai", judge_url=server_url, judge_weighted=True,
    ), embedder=embedder)
    in_process = run_benchmark(RunConfig(**SMALL, judge={"weighted": True}), embedder=embedder)

    assert list(over_http.samples["response"]) == list(in_process.samples["response"])
    for method in ("oracle", "routing"):
        remote, local = _pooled(over_http, method), _pooled(in_process, method)
        for field in ("delta", "ci_low", "ci_high", "win", "tie", "loss", "mean_reward"):
            assert getattr(remote, field) == pytest.approx(getattr(local, field), abs=1e-6), (method, field)
        assert remote.n_users == local.n_users > 0
    # the judge really went over HTTP: probability-weighted scores are rarely whole numbers
    scores = [s for ratings in over_http.samples["ratings"] for s in ratings]
    assert sum(float(s) != round(float(s)) for s in scores) > len(scores) / 2
