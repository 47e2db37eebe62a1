"""apm-tiny-judge: its ratings corpus, its build from an apm-tiny folder, and the shipped copy.

The builds here start from a miniature base (one layer, apm-tiny's own tokenizer, so every score
is one token) and take seconds; the shipped judge is then measured against sim-judge for real.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apm_bench.backends import load_backend, resolve_model
from apm_bench.errors import ConfigError
from apm_bench.judging.agreement import agreement_summary, rated_pairs
from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
from apm_bench.judging.sim_judge import SimJudge
from apm_bench.tiny.build import bundled_folder, checksum, verify, write_model_folder
from apm_bench.tiny.corpus import JUDGE, default_catalog, held_out_prompts
from apm_bench.tiny.judge import JudgeBuildConfig, build_judge, expected_scores, rating_examples, score_tokens
from apm_bench.tiny.model import TinyShape, new_model
from apm_bench.tiny.training import TrainingConfig, encode

MINIATURE = TinyShape(vocab_size=4000, hidden_size=32, intermediate_size=64, layers=1, heads=2, kv_heads=1, context=1024)
QUICK = JudgeBuildConfig(answers=40, ratings=120, validation=20,
                         training=TrainingConfig(steps=40, tokens_per_batch=2048, learning_rate=5e-3, warmup=2,
                                                 prompt_weight=0.0, first_lesson=0))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature apm-tiny folder with a manifest, on the shipped tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("base") / "apm-tiny"
    tokenizer = AutoTokenizer.from_pretrained(bundled_folder())
    write_model_folder(new_model(tokenizer, MINIATURE, seed=0), tokenizer, folder, {"model": "apm-tiny"}, {},
                       time.perf_counter())
    return folder


def test_ratings_are_sim_judges_scores_of_answers_to_trainable_prompts_only() -> None:
    examples = rating_examples("sim-large", answers=30, ratings=60, seed=2)
    _, held_out = held_out_prompts()
    held_texts = {p.text for p in held_out}
    assert len(examples) == 60 and {e.kind for e in examples} == {JUDGE}
    assert {int(e.answer) for e in examples} <= set(range(1, 11)) and len({e.answer for e in examples}) >= 4
    assert not any(text in e.messages[-1][1] for e in examples for text in held_texts)


def test_expected_scores_do_not_depend_on_batching_or_padding(base: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    examples = rating_examples("sim-large", answers=6, ratings=6, seed=0)
    together = expected_scores(model, tokenizer, examples, batch=6)
    alone = np.array([expected_scores(model, tokenizer, [e], batch=1)[0] for e in examples])
    assert len({encode(tokenizer, e).answer_start for e in examples}) > 1  # the batch really is padded
    np.testing.assert_allclose(together, alone, atol=2e-3)
    assert ((together >= 1) & (together <= 10)).all()
    assert len(set(score_tokens(tokenizer))) == 10


def test_a_judge_build_trains_the_base_on_scores_and_records_where_it_came_from(base: Path, tmp_path: Path) -> None:
    first = build_judge(QUICK, tmp_path / "judge", base)
    again = build_judge(QUICK, tmp_path / "again", base)
    assert first["model"] == "apm-tiny-judge" and first["base"]["checksum"] == checksum(base)
    assert first["checksum"] == again["checksum"] == verify(tmp_path / "judge")["checksum"]  # a seed rebuilds the same bytes
    assert first["checksum"] != checksum(base)
    assert (tmp_path / "judge" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert first["training"]["steps"] == 40 and first["training"]["final_loss"] < 6.0  # an untrained model: ln(4000) ≈ 8.3
    assert first["validation"]["ratings"] == 20 and -1 <= first["validation"]["pearson"] <= 1


def test_a_judge_build_refuses_a_base_whose_files_do_not_match_its_manifest(base: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    with pytest.raises(ConfigError, match="does not match its manifest"):
        build_judge(QUICK, tmp_path / "judge", broken)
    assert not (tmp_path / "judge").exists()


def test_the_shipped_judge_matches_its_manifest_and_was_built_from_the_shipped_apm_tiny() -> None:
    manifest = verify(bundled_folder("apm-tiny-judge"))
    assert manifest["bytes"] < 10 * 2**20
    assert manifest["base"]["checksum"] == verify(bundled_folder())["checksum"]
    assert JudgeBuildConfig.model_validate(manifest["build"]) == JudgeBuildConfig()  # the default build, as shipped
    spec = resolve_model("apm-tiny-judge")
    assert spec.backend == "hf" and Path(spec.weights()) == bundled_folder("apm-tiny-judge")


def test_the_shipped_judge_rates_held_out_answers_as_sim_judge_does_where_apm_tiny_does_not() -> None:
    catalog = default_catalog()
    writer = load_backend("sim-large", catalog)

    def agreement(model: str) -> dict:
        engine = load_backend(model, catalog)
        try:
            judge = LLMJudge(engine, catalog.principles, LLMJudgeConfig(weighted=True))
            return agreement_summary(rated_pairs(catalog, held_out_prompts()[1], writer, judge,
                                                 SimJudge(catalog.principles), 90, seed=5))
        finally:
            engine.close()

    judge, writer_model = agreement("apm-tiny-judge"), agreement("apm-tiny")
    assert judge["failed"] == 0 and judge["pearson"] > 0.3, judge
    assert writer_model["pearson"] < 0.15 < judge["pearson"] - writer_model["pearson"]
    sides = judge["instructed_mean_by_side"]
    assert sides["follow"]["judge"] > sides["avoid"]["judge"] + 1


def test_agreement_on_the_command_line_rates_with_weighted_scores_where_asked(tmp_path: Path) -> None:
    from test_cli import apm_inline

    done = apm_inline("judge", "agreement", "--judge-model", "apm-tiny-judge", "--judge-weighted", "--answers", "10",
                      "--out", tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "apm-tiny-judge_weighted-agreement.json").read_text())
    assert summary["scores"] == "weighted" and summary["pairs"] == 20 and summary["failed"] == 0
    scores = pd.read_csv(tmp_path / "apm-tiny-judge_weighted-agreement.csv")["judge"]
    assert (scores % 1 != 0).any()  # expectations over 1..10, not sampled integers


def test_bad_input_to_the_judge_build_and_path_is_one_error_line_before_any_work(tmp_path: Path) -> None:
    from test_cli import apm_inline

    missing = apm_inline("tiny-model", "build-judge", "--base", tmp_path / "nowhere", "--out", tmp_path / "j", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "manifest.json missing" in missing.stderr
    unknown = apm_inline("tiny-model", "path", "apm-tiny-jugde", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no shipped model 'apm-tiny-jugde'")
    assert list(tmp_path.iterdir()) == []
