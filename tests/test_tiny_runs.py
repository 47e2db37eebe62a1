"""The benchmark on a real model, on a laptop: apm-tiny writes the candidates and the answers on the
hf engine (transformers), sim-judge rates them, test users see only prompts apm-tiny never saw, and
soft-prompt and C-BPO train their soft prompts and LoRA adapters on apm-tiny's real weights.
Marked slow (CI runs them with `make test-slow`): `configs/apm-tiny.yaml`'s own population (1 200
users, 300 training and 300 test users), about 7 000 real answers and two training runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from apm_bench.inputs import read_yaml
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "apm-tiny.yaml"
#: the methods under test; baseline and oracle come with every run
TRAINED = ["soft-prompt", "cbpo"]

Interval = tuple[float, float, float]  # Δ, CI low, CI high


def _config(tmp: Path, methods: list[str], **changes: object) -> RunConfig:
    settings = {**read_yaml(CONFIG, "apm-tiny config"), "methods": methods, "cache": tmp / "calls.sqlite",
                "out": tmp / "runs", **changes}
    return RunConfig.model_validate(settings)


def _pooled(config: RunConfig) -> dict[str, Interval]:
    result = run_benchmark(config)
    return {m.method: (m.delta, m.ci_low, m.ci_high) for m in result.metrics if m.world == "pooled"}


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Interval]]:
    tmp = tmp_path_factory.mktemp("tiny-run")
    return {
        "history": _pooled(_config(tmp, ["routing", *TRAINED])),
        # the control needs no training: it checks that nothing personalizes without histories
        "no-history": _pooled(_config(tmp, ["routing"], control="no-history")),
    }


def test_oracle_beats_routing_beats_baseline(deltas) -> None:  # type: ignore[no-untyped-def]
    """Both with 95 % CIs apart: the recorded hf run (results/suite/apm-tiny-hf) measured oracle
    +2.44 [+2.19, +2.68] and routing +0.65 [+0.40, +0.90]."""
    oracle, routing = deltas["history"]["oracle"], deltas["history"]["routing"]
    assert routing[1] > 0, routing
    assert oracle[1] > routing[2], (oracle, routing)


@pytest.mark.parametrize("method", TRAINED)
def test_trained_methods_do_not_yet_raise_the_reward(deltas, method: str) -> None:  # type: ignore[no-untyped-def]
    """What the real model shows today, recorded rather than hoped for: soft-prompt +0.08
    [−0.10, +0.26] and cbpo +0.05 [−0.09, +0.18] in the recorded hf run, neither apart from the
    baseline (the paper found soft prompts do not help either). Fails once one of them does raise
    the reward, or lowers it: then the README's apm-tiny section must say what changed."""
    delta, low, high = deltas["history"][method]
    assert low < 0 < high, (method, delta, low, high)
    assert abs(delta) < 0.4, (method, delta)


def test_without_histories_routing_holds_zero(deltas) -> None:  # type: ignore[no-untyped-def]
    _, low, high = deltas["no-history"]["routing"]
    assert low < 0 < high
