"""The paper's protocol beyond the judge: the authors' instruction and RAG texts (which the simulator
reads as it reads apm-bench's), and a whole protocol run on the simulator."""

from __future__ import annotations

import numpy as np
import pytest

from apm_bench.sim.reader import ContextReader
from apm_bench.sim.style import StyleCodec
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompting import PAPER_RAG_SYSTEM, style_instruction


def test_the_authors_instruction_names_the_principle_bare(catalog: Catalog) -> None:
    casual = next(p for p in catalog.principles if p.id == "casual")
    assert style_instruction(casual, "follow", "paper") == (
        "\nYour task is to respond to the user's prompt while strictly adhering to the following response principle:\n"
        "FOLLOW casual\n\nYou must demonstrate strong casual in your response.\n")
    assert style_instruction(casual, "avoid", "paper").endswith("AVOID casual\n\nYou must avoid any casual in your response.\n")
    assert style_instruction(casual, "follow") != style_instruction(casual, "follow", "paper")  # the default is apm-bench's


@pytest.mark.parametrize("side,sign", [("follow", 1.0), ("avoid", -1.0)])
def test_the_simulator_reads_the_authors_instructions_as_its_own(catalog: Catalog, side: str, sign: float) -> None:
    reader = ContextReader(catalog.principles, catalog.attributes, StyleCodec(catalog.principles))
    for index, principle in enumerate(catalog.principles):
        ours, theirs = style_instruction(principle, side), style_instruction(principle, side, "paper")
        expected = np.zeros(len(catalog.principles))
        expected[index] = sign
        assert (reader.instructions(theirs) == expected).all() and (reader.instructions(ours) == expected).all()
        assert not reader.keywords(theirs).any()  # the instruction is not also read as preference talk


def test_the_authors_rag_prompt_wraps_the_examples() -> None:
    text = PAPER_RAG_SYSTEM.format(examples="<example>\n<prompt>p</prompt>\n</example>")
    assert text.startswith("Below are examples of prompts and responses showing the response styles")
    assert "<examples>\n<example>\n<prompt>p</prompt>\n</example>\n</examples>" in text


def test_the_authors_rewrite_prompt_and_failed_rewrites_discard_the_user(catalog: Catalog) -> None:
    from test_llm_judge import ScriptedBackend

    from apm_bench.backends.base import Generation
    from apm_bench.backends.history_writer import PAPER_REWRITE_SYSTEM, LLMHistoryWriter
    from apm_bench.world.histories import build_population
    from apm_bench.world.prompts import load_prompts
    from apm_bench.world.users import AttributeSetting

    settings = [AttributeSetting(attribute="tech_savvy", side="follow"), AttributeSetting(attribute="anxious", side="follow"),
                AttributeSetting(attribute="verbose", side="avoid")]
    answers = [Generation("analysisThe persona is terse.assistantfinalHow u boil egg", completion_tokens=9),
               Generation("Prime number?? pls", completion_tokens=5)]
    writer = LLMHistoryWriter(ScriptedBackend(answers), catalog, max_tokens=8192, prompt="paper", discard_truncated=True)
    texts = writer.rewrite(["How do I boil an egg?", "What is a prime number?"], settings, None, np.random.default_rng(0))
    assert texts == ["How u boil egg", "Prime number?? pls"]  # the reasoning is not the rewrite
    system, user = writer.backend.requests[0].messages
    assert system.content == PAPER_REWRITE_SYSTEM and "Less is more!" in system.content
    assert "<persona>\nThe simulated user is...\nVERY: tech-savvy, anxious\nNOT AT ALL: verbose\n</persona>" in user.content
    assert "<prompt_to_rewrite>\nHow do I boil an egg?\n</prompt_to_rewrite>" in user.content
    assert "<conversation>\n\n</conversation>" in user.content

    # empty, cut off inside the reasoning, or at the token limit: the user is discarded and counted
    for failure in (Generation(""), Generation("analysisStill thinking about the", completion_tokens=40),
                    Generation("A rewrite that ran to the li", completion_tokens=8192)):
        writer = LLMHistoryWriter(ScriptedBackend([Generation("fine", completion_tokens=3), failure]), catalog,
                                  max_tokens=8192, prompt="paper", discard_truncated=True)
        assert writer.rewrite(["a", "b"], settings, None, np.random.default_rng(0)) is None
        assert writer.failed_rewrites == 1
    # by default a rewrite the budget cut is kept, and counted
    lenient = LLMHistoryWriter(ScriptedBackend([Generation("cut rewri", completion_tokens=64)]), catalog, max_tokens=64)
    assert lenient.rewrite(["a"], settings, None, np.random.default_rng(0)) == ["cut rewri"]
    assert lenient.truncated_rewrites == 1 and lenient.failed_rewrites == 0

    class EveryFourthFails:
        name = model = "every-fourth"
        calls = 0

        def rewrite(self, texts, attributes, persona, rng):  # type: ignore[no-untyped-def]
            self.calls += 1
            return None if self.calls % 4 == 0 else [f"rewritten {t}" for t in texts]

    population = build_population(catalog, load_prompts(), EveryFourthFails(), 40, 1, 2, seed=0)
    assert len(population.users) == 30 and population.discarded_users == 10


def _ultrachat_rows(split: str, count: int) -> list[dict]:
    """Rows in UltraChat's format (made up here): the first user message is the prompt."""
    return [{"prompt": f"{split} question {i}?", "prompt_id": f"{split}-{i:04d}",
             "messages": [{"role": "user", "content": f"{split} question {i}?"},
                          {"role": "assistant", "content": "an answer"},
                          {"role": "user", "content": "a follow-up"}]} for i in range(count)]


def test_prompts_load_from_files_in_ultrachat_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import pandas as pd

    from apm_bench.world.prompts import load_prompts

    rows = _ultrachat_rows("train", 12)
    jsonl = tmp_path / "train_sft.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "train_sft.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    for path in (jsonl, parquet):
        prompts = load_prompts(path)
        assert [p.text for p in prompts] == [f"train question {i}?" for i in range(12)]
        assert prompts[3].id == "train-0003" and prompts[3].category == "ultrachat"


def test_the_protocol_gives_test_users_prompts_no_training_user_sees(catalog: Catalog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from apm_bench.run.config import RunConfig
    from apm_bench.run.setup import load_population, prompt_pools
    from apm_bench.sim.writer import SimHistoryWriter

    class Recording(SimHistoryWriter):
        def __init__(self) -> None:
            super().__init__(catalog)
            self.seen: list[list[str]] = []

        def rewrite(self, texts, attributes, persona, rng):  # type: ignore[no-untyped-def]
            self.seen.append(list(texts))
            return super().rewrite(texts, attributes, persona, rng)

    config = RunConfig(protocol="paper", users=200, worlds=[0])
    writer = Recording()
    population = load_population(config, catalog, writer)
    assert population.test_ids is not None and len(population.test_ids) == round(200 * config.test_fraction)
    testing = {u.id for u in population.users} & set(population.test_ids)
    seen = dict(zip([u.id for u in population.users], writer.seen))
    test_texts = {t for uid in testing for t in seen[uid]}
    train_texts = {t for uid, texts in seen.items() if uid not in testing for t in texts}
    assert test_texts and train_texts and not test_texts & train_texts
    train_pool, test_pool = prompt_pools(config)
    assert test_pool is not None and not {p.id for p in train_pool} & {p.id for p in test_pool}

    # with UltraChat's two splits as files, each side draws from its own
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _ultrachat_rows(split, 30)))
    files = RunConfig(protocol="paper", users=60, prompts_file=tmp_path / "train.jsonl",
                      test_prompts_file=tmp_path / "test.jsonl")
    writer = Recording()
    population = load_population(files, catalog, writer)
    for user, texts in zip(population.users, writer.seen):
        expected = "test" if user.id in population.test_ids else "train"
        assert all(t.startswith(expected) for t in texts)


def test_a_protocol_run_on_the_simulator(embedder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from apm_bench.run.config import RunConfig
    from apm_bench.run.runner import run_benchmark

    config = RunConfig(protocol="paper", users=220, worlds=[0, 1], methods=["routing", "rag"],
                       cache=tmp_path / "calls.sqlite", out=tmp_path / "runs")
    result = run_benchmark(config, embedder=embedder)
    samples, pooled = result.samples, {m.method: m for m in result.metrics if m.world == "pooled"}
    assert {"baseline", "oracle", "oracle-router", "prior", "routing", "rag"} == set(samples["method"])
    assert pooled["oracle-router"].gain == pytest.approx(1.0) and pooled["oracle"].gain != pytest.approx(1.0)
    # the perfect router and the instructed oracle both personalize; the router picks the label the
    # judge scored best on the user's own candidates
    assert pooled["oracle-router"].ci_low > 0 and pooled["oracle"].ci_low > 0
    routed = samples[samples["method"] == "routing"]["system_prompt"]
    assert routed.str.startswith("\nYour task is to respond to the user's prompt while strictly adhering").all()
    # one fixed test set across worlds, and one baseline response per test user
    by_world = samples[samples["method"] == "baseline"].groupby("world")
    assert by_world["user_id"].apply(sorted).apply(tuple).nunique() == 1
    assert by_world["response"].apply(list).apply(tuple).nunique() == 1
    assert result.costs["population"] == {"users": 220.0, "discarded_users": 0.0}
    assert len(samples[(samples["method"] == "baseline") & (samples["world"] == 0)]) == round(220 * 1000 / 5500)


def test_a_hub_split_offline_is_one_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from apm_bench.errors import PromptFileError
    from apm_bench.world.prompts import load_prompts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never a download in tests
    with pytest.raises(PromptFileError, match="cannot fetch HuggingFaceH4/ultrachat_200k:test_sft from the Hugging Face hub"):
        load_prompts(Path("HuggingFaceH4/ultrachat_200k:test_sft"))
