"""The benchmark on a real model, on a laptop: apm-tiny writes the candidates and the answers on the
hf engine (transformers), sim-judge rates them, test users see only prompts apm-tiny never saw.
Marked slow (CI runs them with `make test-slow`): a run generates a few thousand real answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from apm_bench.inputs import read_yaml
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark

pytestmark = pytest.mark.slow
USERS = 200
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "apm-tiny.yaml"


def _config(tmp: Path, **changes: object) -> RunConfig:
    # the config's population at USERS users, every training user fitted (its train_users cap is for 1 200)
    settings = {**read_yaml(CONFIG, "apm-tiny config"), "methods": ["routing"], "users": USERS, "train_users": None,
                "cache": tmp / "calls.sqlite", "out": tmp / "runs", **changes}
    return RunConfig.model_validate(settings)


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, tuple[float, float, float]]]:
    tmp = tmp_path_factory.mktemp("tiny-run")
    found = {}
    for label, control in (("history", None), ("no-history", "no-history")):
        result = run_benchmark(_config(tmp, control=control))
        found[label] = {m.method: (m.delta, m.ci_low, m.ci_high) for m in result.metrics if m.world == "pooled"}
    return found


def test_the_oracle_beats_the_baseline_and_routing(deltas) -> None:  # type: ignore[no-untyped-def]
    """apm-tiny follows instructions (the oracle's), but its own candidates are too noisy a
    signal for routing to beat the baseline yet: at 400 users the previous build's routing
    measured +0.12 [−0.31, +0.55] against the oracle's +1.35 [+0.85, +1.84] (README). Routing must
    not beat the oracle."""
    oracle, routing = deltas["history"]["oracle"], deltas["history"]["routing"]
    assert oracle[1] > 0, oracle
    assert oracle[0] > routing[2], (oracle, routing)


def test_without_histories_routing_holds_zero(deltas) -> None:  # type: ignore[no-untyped-def]
    _, low, high = deltas["no-history"]["routing"]
    assert low < 0 < high
