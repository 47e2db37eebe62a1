"""`apm judge agreement`: an LLM judge's scores against sim-judge's on the same answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apm_bench.backends import load_backend
from apm_bench.judging.agreement import agreement_summary, rated_pairs, write_agreement
from apm_bench.judging.judge import Judge, Rating, RatingRequest
from apm_bench.judging.sim_judge import SimJudge
from apm_bench.run.config import RunConfig
from apm_bench.run.setup import load_pool_catalog
from apm_bench.world.prompts import load_prompts

CATALOG = load_pool_catalog(RunConfig())


class Shifted(Judge):
    """sim-judge's score moved by `shift` (clipped to the scale); a constant when `shift` is None."""

    name = "shifted"

    def __init__(self, shift: float | None) -> None:
        self.inner, self.shift = SimJudge(CATALOG.principles), shift

    def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
        if self.shift is None:
            return [Rating(5.0) for _ in requests]
        return [Rating(float(np.clip(r.score + self.shift, 1, 10))) for r in self.inner.rate(requests)]


def _pairs(judge: Judge, answers: int = 60):  # type: ignore[no-untyped-def]
    writer = load_backend("sim-large", CATALOG)
    return rated_pairs(CATALOG, load_prompts(None)[:40], writer, judge, SimJudge(CATALOG.principles), answers, seed=3)


def test_a_judge_that_rates_as_sim_judge_agrees_fully_and_the_sides_separate() -> None:
    pairs = _pairs(SimJudge(CATALOG.principles))
    assert len(pairs) == 120 and set(pairs["probed"]) == {"instructed", "random"}
    summary = agreement_summary(pairs)
    assert (summary["pearson"], summary["exact"], summary["mean_abs_diff"], summary["failed"]) == (1.0, 1.0, 0.0, 0)
    sides = summary["instructed_mean_by_side"]
    assert sides["follow"]["reference"] > sides["none"]["reference"] + 2 > sides["avoid"]["reference"] + 4


def test_a_lenient_judge_correlates_but_its_drift_shows_and_a_constant_judge_shows_no_correlation() -> None:
    lenient = agreement_summary(_pairs(Shifted(2.0)))
    assert lenient["pearson"] > 0.9 and 1.0 < lenient["mean_abs_diff"] <= 2.0 and lenient["exact"] < 0.2
    assert lenient["random_mean"]["judge"] > lenient["random_mean"]["reference"] + 1
    constant = agreement_summary(_pairs(Shifted(None)))
    assert constant["pearson"] is None and constant["instructed_mean_by_side"]["follow"]["judge"] == 5.0


def test_failed_ratings_are_counted_and_left_out_of_the_statistics(tmp_path: Path) -> None:
    class Failing(Shifted):
        def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
            return [Rating(None, "unparseable") if i % 3 == 0 else r for i, r in enumerate(super().rate(requests))]

    pairs = _pairs(Failing(0.0))
    summary = agreement_summary(pairs)
    assert summary["failed"] == 40 and summary["pearson"] == 1.0
    paths = write_agreement(pairs, summary, tmp_path, "judge/x", "sim-judge")
    assert [p.name for p in paths] == ["judge_x-agreement.csv", "judge_x-agreement.json", "judge_x-agreement.md"]
    assert json.loads(paths[1].read_text())["failed"] == 40
    assert "40 ratings failed" in paths[2].read_text() and "scores sampled" in paths[2].read_text()
    weighted = write_agreement(pairs, summary, tmp_path, "judge/x", "sim-judge", weighted=True)
    assert weighted[2].name == "judge_x_weighted-agreement.md" and paths[2].is_file()  # beside the sampled one
    assert json.loads(weighted[1].read_text())["scores"] == "weighted"


def test_bad_input_to_the_command_is_one_error_line_before_any_work(tmp_path: Path) -> None:
    from test_cli import apm_inline

    unknown = apm_inline("judge", "agreement", "--judge-model", "apm-tinny", "--out", tmp_path / "o", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: ") and "Did you mean 'apm-tiny'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    few = apm_inline("judge", "agreement", "--judge-model", "apm-tiny", "--answers", "5", "--out", tmp_path / "o", cwd=tmp_path)
    assert few.returncode == 2 and "--answers" in few.stderr
    engine = apm_inline("judge", "agreement", "--judge-model", "apm-tiny", "--judge-backend", "vlm", "--out", tmp_path / "o",
                        cwd=tmp_path)
    assert engine.returncode == 2 and engine.stderr.startswith("error: unknown backend 'vlm'")
    assert list(tmp_path.iterdir()) == []  # nothing written
