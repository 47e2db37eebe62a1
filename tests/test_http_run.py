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


def test_a_server_killed_and_restarted_mid_run_is_retried_and_the_metrics_are_identical(
    embedder: HistoryEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import threading
    import time

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = tmp_path_factory.mktemp("restarted") / "server.log"
    command = [sys.executable, "-m", "apm_bench.cli", "serve-sim", "--port", str(port)]
    servers = [start(command, log)]
    wait_until_serving(url, servers[0], log, timeout=60)
    stages: list[str] = []

    def outage() -> None:  # once the run has begun: down for about 3 s, then the same server again
        while not stages:
            time.sleep(0.05)
        time.sleep(0.5)
        stop(servers[0])
        time.sleep(3)
        servers.append(start(command, log))

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        over_http = run_benchmark(RunConfig(**SMALL, backend="openai", base_url=url),
                                  progress=lambda text, done, total: stages.append(text), embedder=embedder)
    finally:
        thread.join()
        stop(servers[-1])
    in_process = run_benchmark(RunConfig(**SMALL), embedder=embedder)
    assert any("retry" in s for s in stages)  # the outage happened, and the progress line said so
    assert list(over_http.samples["response"]) == list(in_process.samples["response"])
    for method in ("oracle", "routing"):
        assert _pooled(over_http, method).model_dump() == _pooled(in_process, method).model_dump()


def _unreachable_run(base_url: str) -> RunConfig:
    fast_fail = {"connect_timeout": 1, "retry_budget": 5, "max_retries": 50}
    return RunConfig(**SMALL, backend="openai", base_url=base_url, engine_options={"generator": fast_fail},
                     allow_simulated_roles=True)


def test_a_dead_port_and_an_unreachable_address_fail_with_one_error_within_the_retry_budget(embedder: HistoryEmbedder) -> None:
    import socket

    from apm_bench.backends.openai_compat import RemoteCallError

    # nothing listens: refused at once, retried until the budget is spent
    with pytest.raises(RemoteCallError, match="failed every request for .* s \\(retry budget 5 s\\)"):
        run_benchmark(_unreachable_run(f"http://127.0.0.1:{free_port()}/v1"), embedder=embedder)
    # a blackhole: a port whose full accept queue drops every new connection, so connects hang
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
    try:
        with pytest.raises(RemoteCallError, match="APITimeoutError"):
            run_benchmark(_unreachable_run(f"http://127.0.0.1:{port}/v1"), embedder=embedder)
    finally:
        for sock in (*fillers, server):
            sock.close()
