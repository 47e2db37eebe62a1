"""A whole `apm run` of every kind of method (in-context, retrieval, routing, and the two that train
weights) with every role on vLLM engines under an engine budget of 1: phases keep the engine loads
few, no two engines are ever alive together, and a run killed with -9 resumes without making any
call twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apm_bench.cache import CallCache


METHODS = "routing,history,rag,soft-prompt,cbpo"
#: a few training steps: the run checks the path (train on transformers, serve on vLLM), not quality
TRAINING = {"method_options": {"soft-prompt": {"epochs": 2, "batch_size": 8, "hidden": 32, "rank": 4},
                               "cbpo": {"epochs": 2, "batch_size": 8, "rank": 4}}}


def _command(generator: Path, judge: Path, cache: Path, out: Path) -> list[str]:
    config = cache.parent / "training.json"  # JSON is YAML
    config.write_text(json.dumps(TRAINING))
    # a random-weight judge's answer barely depends on the response; sampled (seeded, one seed per
    # rating) it still tells candidates apart, which rag, soft-prompt and cbpo need to learn anything
    return [sys.executable, "-m", "apm_bench.cli", "run", "--method", METHODS, "--config", str(config),
            "--model", str(generator), "--backend", "vllm", "--candidate-model", str(generator),
            "--writer-model", str(generator), "--judge-model", str(judge), "--judge-backend", "vllm",
            "--judge-temperature", "1", "--users", "24", "--worlds", "1", "--history-len", "2",
            "--max-tokens", "12", "--engine-budget", "1", "--cache", str(cache), "--out", str(out)]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ})


def _record(out: Path) -> dict:
    newest = max(out.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())


@pytest.fixture(scope="module")
def first_run(generator_dir: Path, judge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("vllm-run")
    proc = _run(_command(generator_dir, judge_dir, folder / "calls.sqlite", folder / "runs"), folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, _record(folder / "runs")


def test_every_role_runs_on_vllm_with_one_engine_at_a_time(first_run: tuple[Path, dict]) -> None:
    _, record = first_run
    engines = record["costs"]["engines"]
    # history writer + candidates on the generator, candidate ratings on the judge, soft-prompt's
    # and cbpo's training on the generator's model in transformers (one trainer for both), all test
    # generations on the generator (now serving their adapters and soft prompts), all ratings on
    # the judge: five loads, never two at once
    assert engines["engine_loads"] == 5 and engines["max_engines_resident"] == 1
    assert record["costs"]["phase:generation"]["requests"] > 0 and record["costs"]["phase:judging"]["requests"] > 0
    methods = {m["method"] for m in record["metrics"]}
    assert {"baseline", "oracle", "prior", "routing", "history", "rag", "soft-prompt", "cbpo"} <= methods
    assert record["costs"]["fit:soft-prompt"]["training_steps"] > 0 and record["costs"]["fit:cbpo"]["training_steps"] > 0
    pooled = [m for m in record["metrics"] if m["world"] == "pooled"]
    # a random-weight judge rarely writes a valid score: its failures are counted, never scored
    assert all(m["failed_ratings"] + m["n_users"] > 0 for m in pooled)


def test_a_finished_run_reruns_without_loading_an_engine(first_run: tuple[Path, dict], generator_dir: Path,
                                                         judge_dir: Path) -> None:
    folder, record = first_run
    proc = _run(_command(generator_dir, judge_dir, folder / "calls.sqlite", folder / "runs"), folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _record(folder / "runs")
    assert again["costs"]["engines"]["engine_loads"] == 0  # trained weights come from the artifact store
    assert [m["delta"] for m in again["metrics"]] == [m["delta"] for m in record["metrics"]]


def test_a_run_killed_mid_way_resumes_without_repeating_a_call(generator_dir: Path, judge_dir: Path,
                                                               tmp_path: Path) -> None:
    cache = tmp_path / "calls.sqlite"
    command = _command(generator_dir, judge_dir, cache, tmp_path / "runs")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 600
    stored = 0
    while time.time() < deadline and process.poll() is None:
        time.sleep(2)
        if cache.is_file():
            try:
                with sqlite3.connect(cache) as connection:
                    stored = connection.execute("SELECT count(*) FROM calls WHERE value IS NOT NULL").fetchone()[0]
            except sqlite3.OperationalError:
                continue
        if stored >= 60:  # the histories are written, later phases are under way
            break
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    proc = _run(command, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = CallCache(cache).computations()
    assert counts and max(counts.values()) == 1  # nothing computed twice
