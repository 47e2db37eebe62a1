"""The same benchmark through the OpenAI backend against real vLLM API servers (one for the
generator, one for the judge), checked against the offline vllm path: every request is seeded (and
vLLM samples each request from a generator of its own seed), the judge decodes under a
structured-output choice on both paths, so both decode the same tokens and their metrics agree.

Soft prompts cannot travel over the chat API and adapters would have to be loaded into the server,
so this run covers the methods that send text (baseline, oracle, prior, history, routing, rag).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_server import free_port, start, stop, wait_until_serving

#: seeded sampling everywhere: deterministic, and a random-weight judge sampled with a seed per
#: rating still tells candidates apart (greedy, it gives every candidate the same score)
DETERMINISTIC = {"temperature": 1.0, "judge_temperature": 1.0, "users": 24, "worlds": [0], "history_len": 2, "max_tokens": 12,
                 "methods": ["history", "routing", "rag"]}
ROLES = ("candidate", "writer", "judge")


@pytest.fixture(scope="module")
def servers(generator_dir: Path, judge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two API servers on loopback ports; seeded requests need chunked prefill off on the CPU build."""
    logs = tmp_path_factory.mktemp("servers")
    started: dict[str, tuple[subprocess.Popen, Path]] = {}
    urls = {}
    try:
        for role, model in (("generator", generator_dir), ("judge", judge_dir)):
            port = free_port()
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                       "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "4096",
                       "--enforce-eager", "--no-enable-chunked-prefill"]
            log = logs / f"{role}.log"
            started[role] = (start(command, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}), log)
            urls[role] = f"http://127.0.0.1:{port}/v1"
        for role, (process, log) in started.items():  # both start at once; then each must answer
            wait_until_serving(urls[role], process, log, timeout=300)
        yield urls
    finally:
        for process, _ in started.values():
            stop(process)


def _apm_run(config: dict, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"  # JSON is YAML
    path.write_text(json.dumps({**config, "cache": str(folder / "calls.sqlite"), "out": str(folder / "runs")}))
    proc = subprocess.run([sys.executable, "-m", "apm_bench.cli", "run", "--config", str(path)], cwd=folder,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((folder / "runs").glob("*/metrics.json")).parent
    import pandas as pd

    return {"metrics": json.loads((run / "metrics.json").read_text()),
            "samples": pd.read_parquet(run / "samples.parquet")}


def _roles(model: Path, judge: Path, backend: str, urls: dict[str, str] | None = None) -> dict:
    config = {"model": str(model), "backend": backend, "judge_model": str(judge), "judge_backend": backend,
              "candidate_model": str(model), "candidate_backend": backend, "writer_model": str(model),
              "writer_backend": backend}
    if urls is not None:
        config.update(base_url=urls["generator"], candidate_url=urls["generator"], writer_url=urls["generator"],
                      judge_url=urls["judge"], engine_options={"judge": {"structured_outputs": True}})
    else:
        config["engine_options"] = {"generator": {"dtype": "float32"}, "judge": {"dtype": "float32"}}
    return config


@pytest.fixture(scope="module")
def over_http(servers: dict[str, str], generator_dir: Path, judge_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _apm_run({**DETERMINISTIC, **_roles(generator_dir, judge_dir, "openai", servers)},
                    tmp_path_factory.mktemp("http-run"))


@pytest.fixture(scope="module")
def offline(generator_dir: Path, judge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _apm_run({**DETERMINISTIC, **_roles(generator_dir, judge_dir, "vllm")}, tmp_path_factory.mktemp("offline-run"))


def test_a_run_through_vllm_servers_completes_with_every_rating_parsed(over_http: dict) -> None:
    samples = over_http["samples"]
    assert set(samples["method"]) == {"baseline", "oracle", "prior", "history", "routing", "rag"}
    assert samples["generation_error"].isna().all()
    # the judge server decodes under vLLM's structured_outputs: a random model's ratings all parse
    assert int(samples["failed_ratings"].sum()) == 0 and samples["reward"].notna().all()


def test_the_http_path_agrees_with_the_offline_path(over_http: dict, offline: dict) -> None:
    columns = ["world", "method", "user_id", "response", "reward"]
    remote = over_http["samples"][columns].sort_values(["method", "user_id"]).reset_index(drop=True)
    local = offline["samples"][columns].sort_values(["method", "user_id"]).reset_index(drop=True)
    assert list(remote["response"]) == list(local["response"])
    assert list(remote["reward"]) == pytest.approx(list(local["reward"]))
    pooled = {(m["method"], m["world"]): m["delta"] for m in offline["metrics"]["metrics"]}
    for entry in over_http["metrics"]["metrics"]:
        assert entry["delta"] == pytest.approx(pooled[(entry["method"], entry["world"])], nan_ok=True)
