"""The APM authors' judge under the protocol: their prompt with the bare principle name, a 1–100
rating divided by 10, the lenient parse (the last number in range), and the forced answer that
continues reasoning cut off by the token budget, on answer texts as real judges write them."""

from __future__ import annotations

import pytest
from test_llm_judge import ScriptedBackend

from apm_bench.backends.base import Generation
from apm_bench.judging.judge import RatingRequest
from apm_bench.judging.judge_prompts import PAPER_SYSTEM_THINKING, parse_judge_messages
from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig, parse_lenient_score
from apm_bench.run.protocol import paper_judge_config
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompting import bare_name

PAPER = paper_judge_config()

GPT_OSS = ("analysisThe user asks about tax forms. The response uses warm, reassuring phrases like 'no worries'. "
           "It is moderately gentle, maybe 70 out of 100, but it also says 'just do it' twice. I'd say 72."
           "assistantfinal72")
THINK = "<think>\nThe answer is blunt: 'Do X. Then Y.' Not gentle at all; 1-100 scale, around 12.\n</think>\n\n12"
CUT = "analysisLet me weigh the tone. The first sentence is soft, the second is terse, on a scale from 1 to"


def test_the_prompt_is_the_authors_with_the_bare_principle_name(catalog: Catalog) -> None:
    gentle = next(p for p in catalog.principles if p.id == "gentle")
    judge = LLMJudge(ScriptedBackend([Generation("55")]), list(catalog.principles), PAPER)
    judge.rate([RatingRequest("How do I fill in form W-9?", "Fill in boxes 1 to 4.", "gentle", seed=0)])
    system, user = judge.backend.requests[0].messages
    assert system.content == PAPER_SYSTEM_THINKING
    assert "<attribute>\ngentle\n</attribute>" in user.content and gentle.description not in user.content
    assert "<message role='user'>How do I fill in form W-9?</message>" in user.content
    assert user.content.rstrip().endswith("Your evaluation (1-100):")
    assert parse_judge_messages((system, user)) == (bare_name(gentle), "How do I fill in form W-9?", "Fill in boxes 1 to 4.")
    params = judge.backend.requests[0].params
    assert (params.temperature, params.top_p, params.max_tokens, params.choices) == (1.0, 0.95, 4096, None)


@pytest.mark.parametrize("text,score", [(GPT_OSS, 72), (THINK, 12), ("100", 100), ("Score: 7 out of 100 -> 64", 64),
                                        ("1", 1)])
def test_the_lenient_parse_takes_the_last_number_in_range_after_the_reasoning(text: str, score: int) -> None:
    assert parse_lenient_score(text) == score


@pytest.mark.parametrize("text", ["150", "0", "none of them", CUT, "<think>maybe 40 or 50"])
def test_out_of_range_numbers_and_unfinished_reasoning_are_not_scores(text: str) -> None:
    assert parse_lenient_score(text) is None


def test_ratings_are_divided_by_ten(catalog: Catalog) -> None:
    judge = LLMJudge(ScriptedBackend([Generation(GPT_OSS), Generation(THINK), Generation("150"), Generation("150"),
                                      Generation("150")]), list(catalog.principles), PAPER)
    ratings = judge.rate([RatingRequest("p", "r", "gentle", seed=i) for i in range(3)])
    assert ratings[0].score == pytest.approx(7.2) and ratings[1].score == pytest.approx(1.2)
    assert ratings[2].failed  # out of range on all three attempts


def test_reasoning_cut_off_by_the_budget_is_continued_into_a_forced_rating(catalog: Catalog) -> None:
    backend = ScriptedBackend([Generation(CUT), Generation("64")])
    judge = LLMJudge(backend, list(catalog.principles), PAPER)
    rating = judge.rate([RatingRequest("p", "r", "gentle", seed=0)])[0]
    assert rating.score == pytest.approx(6.4) and judge.forced_answers == 1
    first, forced = backend.requests
    assert forced.messages == first.messages  # the same answer continued, not a new turn
    assert forced.prefill == CUT + "</think>\n\nRating: " and forced.params.max_tokens == 4
    assert forced.params.temperature == 1.0 and forced.params.top_p == 0.95


def test_three_attempts_then_a_failure_the_reward_skips(catalog: Catalog) -> None:
    from apm_bench.judging.reward import weighted_reward
    from apm_bench.world.users import Target

    backend = ScriptedBackend([Generation("no idea")] * 3)
    rating = LLMJudge(backend, list(catalog.principles), PAPER).rate([RatingRequest("p", "r", "gentle", seed=0)])[0]
    assert rating.failed and len(backend.requests) == 3
    targets = [Target(principle="gentle", side="follow", weight=0.5), Target(principle="casual", side="avoid", weight=0.5)]
    reward = weighted_reward(targets, [rating, type(rating)(score=3.0)])
    assert reward.value == pytest.approx(11 - 3.0) and reward.failed_ratings == 1  # dropped, the rest renormalised
    assert weighted_reward(targets[:1], [rating]).value is None  # all failed: the user drops out, counted


def test_the_paper_protocol_fills_what_a_run_leaves_unset() -> None:
    from apm_bench.run.config import RunConfig
    from apm_bench.run.protocol import PROTOCOLS

    paper = RunConfig(protocol="paper")
    for field, value in PROTOCOLS["paper"].items():
        assert getattr(paper, field) == value, field
    assert paper.max_targets == paper.n_attr == 1
    assert round(paper.users * paper.test_fraction) == 1000 and round(paper.users * paper.validation_fraction) == 500
    ablation = RunConfig(protocol="paper", history_len=4, n_attr=2, worlds=[0, 1, 2, 3, 4])
    assert ablation.history_len == 4 and ablation.worlds == [0, 1, 2, 3, 4] and ablation.max_targets == 2
    assert RunConfig().judge_scale == 10 and RunConfig().history_len == 8  # the default protocol is unchanged
    with pytest.raises(ValueError, match="judge_scale 10"):
        RunConfig(protocol="paper", judge_weighted=True)
