"""The shipped apm-tiny on the hf engine: it reads the benchmark's contexts on prompts it never saw.

These run the real model (4.2 M parameters, float32 on the CPU) through the same `Backend` every
run uses, and rate its answers with sim-judge, as the README's "Try the real-engine path" does.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from apm_bench.tiny.behaviour import BehaviourConfig, behaviour_report


@pytest.fixture(scope="module")
def behaviour(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("behaviour")
    behaviour_report("apm-tiny", None, {}, BehaviourConfig(prompts_per_principle=4), out)
    return pd.read_csv(out / "behaviour.csv")


def _overall(summary: pd.DataFrame, probe: str, model: str) -> pd.Series:
    return summary[(summary["probe"] == probe) & (summary["model"] == model) & (summary["principle"] == "all")].iloc[0]


def test_apm_tiny_follows_and_avoids_instructed_principles(behaviour: pd.DataFrame) -> None:
    tiny, teacher = _overall(behaviour, "instruction", "apm-tiny"), _overall(behaviour, "instruction", "sim-large")
    assert tiny["follow"] > tiny["none"] > tiny["avoid"]
    assert tiny["gap"] > 2.5 and tiny["right_side"] > 0.7  # measured at 20 prompts per principle: 4.35, 86 %
    assert teacher["gap"] > tiny["gap"] - 1  # the teacher is the better writer, or close


def test_apm_tiny_does_not_yet_read_summaries_or_examples(behaviour: pd.DataFrame) -> None:
    """What the README states: the shipped build learned instructions, not yet RAG's examples or
    POPI's summaries (measured at 20 prompts per principle: gaps +0.16 and −0.17, against
    sim-large's +7.61 and +3.89). A build that learns them fails this test: update the README."""
    for probe in ("imitation", "summary"):
        tiny, teacher = _overall(behaviour, probe, "apm-tiny"), _overall(behaviour, probe, "sim-large")
        assert abs(tiny["gap"]) < 1.5 < teacher["gap"], probe
