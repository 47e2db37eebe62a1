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
    assert tiny["gap"] > 2.5 and tiny["right_side"] > 0.7  # measured at 20 prompts per principle: 4.86, 88 %
    assert teacher["gap"] > tiny["gap"] - 1  # the teacher is the better writer, or close


def test_apm_tiny_does_not_yet_read_summaries_or_examples(behaviour: pd.DataFrame) -> None:
    """What the README states: the shipped build learned instructions, not yet RAG's examples or
    POPI's summaries (measured at 20 prompts per principle: gaps +0.04 and −0.11, against
    sim-large's +7.61 and +3.89). A build that learns them fails this test: update the README."""
    for probe in ("imitation", "summary"):
        tiny, teacher = _overall(behaviour, probe, "apm-tiny"), _overall(behaviour, probe, "sim-large")
        assert abs(tiny["gap"]) < 1.5 < teacher["gap"], probe


def test_apm_tiny_answers_the_judges_request_with_a_score_but_does_not_yet_rate_like_sim_judge() -> None:
    """What the README states: as an LLM judge, apm-tiny always answers with a parseable score, but
    its scores do not follow sim-judge's (300 answers: Pearson 0.005). A build that learns to
    judge fails this test: update the README and the agreement figures."""
    from apm_bench.backends import load_backend
    from apm_bench.judging.agreement import agreement_summary, rated_pairs
    from apm_bench.judging.llm_judge import LLMJudge
    from apm_bench.judging.sim_judge import SimJudge
    from apm_bench.run.config import RunConfig
    from apm_bench.run.setup import load_pool_catalog
    from apm_bench.tiny.corpus import held_out_prompts

    catalog = load_pool_catalog(RunConfig())
    engine = load_backend("apm-tiny", catalog)
    pairs = rated_pairs(catalog, held_out_prompts()[1], load_backend("sim-large", catalog),
                        LLMJudge(engine, catalog.principles), SimJudge(catalog.principles), answers=60, seed=1)
    summary = agreement_summary(pairs)
    assert summary["failed"] == 0
    assert summary["pearson"] is None or abs(summary["pearson"]) < 0.35, summary
    follow, avoid = (summary["instructed_mean_by_side"][side]["reference"] for side in ("follow", "avoid"))
    assert follow - avoid > 4  # the answers it rates do differ: sim-judge tells them apart


def test_apm_tiny_as_history_writer_shows_traits_but_does_not_keep_the_request() -> None:
    """What the README states: asked to rewrite a prompt it never saw, apm-tiny writes trait
    phrases around a request from its training prompts instead of copying the one it was given."""
    import numpy as np

    from apm_bench.backends import load_backend
    from apm_bench.backends.history_writer import LLMHistoryWriter
    from apm_bench.run.config import RunConfig
    from apm_bench.run.setup import load_pool_catalog
    from apm_bench.tiny.corpus import held_out_prompts
    from apm_bench.world.users import AttributeSetting

    catalog = load_pool_catalog(RunConfig())
    writer = LLMHistoryWriter(load_backend("apm-tiny", catalog), catalog, max_tokens=200)
    prompts = held_out_prompts()[1][:12]
    rng = np.random.default_rng(0)
    kept = 0
    for i, prompt in enumerate(prompts):
        setting = AttributeSetting(attribute=catalog.attributes[i % len(catalog.attributes)].id,
                                   side="follow" if i % 2 else "avoid")
        rewritten = writer.rewrite([prompt.text], [setting], None, rng)
        assert rewritten is not None and rewritten[0].strip()  # it answers every request
        kept += prompt.text in rewritten[0]
    assert kept <= 3, kept
