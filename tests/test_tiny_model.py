"""apm-tiny: its corpus, its build, the shipped copy and the alias that loads it.

The builds here are miniature (a 1-layer model, a few steps) so they take seconds; what they
check (held-out prompts stay out, a seed reproduces the same bytes, training lowers the loss, a
changed file is caught) holds for the full build the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apm_bench.backends import load_backend, resolve_model
from apm_bench.backends.base import Message
from apm_bench.errors import ConfigError
from apm_bench.run.config import RunConfig
from apm_bench.run.engines import check_roles
from apm_bench.run.setup import load_pool_catalog, prompt_pools
from apm_bench.tiny.build import BuildConfig, build, bundled_folder, checksum, verify
from apm_bench.tiny.corpus import CorpusConfig, Example, balance, held_out_prompts, kind_counts, record_corpus
from apm_bench.tiny.model import TinyShape
from apm_bench.tiny.training import TrainingConfig

SMALL = CorpusConfig(runs=1, users=60, worlds=1, plain=100, judge=30, rewrite=20, per_kind={k: 40 for k in
                                                            ("instruction", "summary-context", "summary-request",
                                                             "examples", "history", "bare")})
MINIATURE = TinyShape(vocab_size=400, hidden_size=32, intermediate_size=64, layers=1, heads=2, kv_heads=1, context=1024)


@pytest.fixture(scope="module")
def corpus() -> list[Example]:
    return record_corpus(SMALL)


def test_the_corpus_holds_every_kind_of_context_methods_send(corpus: list[Example]) -> None:
    counts = kind_counts(corpus)
    assert set(counts) == {"plain", "instruction", "summary-context", "summary-request", "examples", "history", "bare",
                           "judge", "rewrite"}
    assert (counts.pop("plain"), counts.pop("judge"), counts.pop("rewrite")) == (100, 30, 20)
    assert all(0 < n <= 40 for n in counts.values())
    examples = next(e for e in corpus if e.kind == "examples")
    assert "<best_response>" in examples.messages[0][1] and "<worst_response>" in examples.messages[0][1]


def test_judge_examples_are_the_llm_judges_request_answered_with_sim_judges_score(corpus: list[Example]) -> None:
    """What apm-tiny learns as a judge is exactly what the LLM judge asks and what sim-judge answers."""
    from apm_bench.judging.judge_prompts import parse_judge_messages
    from apm_bench.judging.sim_judge import SimJudge

    catalog = load_pool_catalog(RunConfig())
    judged = [e for e in corpus if e.kind == "judge"]
    sim = SimJudge(catalog.principles)
    measured, taught, words = [], [], 0
    for example in judged:
        principle, _, response = parse_judge_messages([Message(role, content) for role, content in example.messages])
        assert 1 <= int(example.answer) <= 10
        if principle not in catalog.principle_ids:  # a word of an antonym pair, as `apm judge calibrate` asks
            words += principle in catalog.antonyms.descriptions
            continue
        measured.append(sim.codec.measure(response)[catalog.principle_ids.index(principle)])
        taught.append(int(example.answer))
    assert words == len(judged) - len(taught) > 0
    assert min(taught) <= 3 and max(taught) >= 8  # both ends of the scale are taught, not only the midpoint
    assert np.corrcoef(measured, taught)[0, 1] > 0.8  # the score is the one the answer's markers earn


def test_rewrite_examples_keep_the_request_and_show_the_traits(corpus: list[Example]) -> None:
    from apm_bench.backends.history_writer import REWRITE_SYSTEM

    rewrites = [e for e in corpus if e.kind == "rewrite"]
    catalog = load_pool_catalog(RunConfig())
    phrases = {phrase for a in catalog.attributes for side in ("follow", "avoid") for phrase in a.side(side).phrases}
    for example in rewrites:
        assert example.messages[0] == ("system", REWRITE_SYSTEM)
        request = example.messages[1][1].split("Request to rewrite:\n", 1)[1]
        assert request in example.answer
    assert sum(any(phrase in e.answer for phrase in phrases) for e in rewrites) > len(rewrites) / 2


def test_no_prompt_evaluation_uses_reaches_the_corpus(corpus: list[Example]) -> None:
    trainable, held_out = held_out_prompts()
    assert len(held_out) == 96 and not {p.id for p in trainable} & {p.id for p in held_out}
    texts = [content for e in corpus for _, content in e.messages] + [e.answer for e in corpus]
    leaked = [p.id for p in held_out if any(p.text in text for text in texts)]
    assert leaked == []
    assert sum(any(p.text in text for text in texts) for p in trainable) > 50  # the check can see prompts


def test_the_held_out_prompts_are_what_a_disjoint_run_tests_on() -> None:
    _, test_pool = prompt_pools(RunConfig(disjoint_test_prompts=True))
    assert [p.id for p in test_pool] == [p.id for p in held_out_prompts()[1]]


def test_balance_keeps_distinct_examples_up_to_each_kinds_quota() -> None:
    rows = [Example(kind="a", messages=[("user", str(i % 7))], answer="x") for i in range(30)]
    rows += [Example(kind="b", messages=[("user", str(i))], answer="y") for i in range(5)]
    kept = balance(rows, {"a": 3, "b": 10}, seed=1)
    assert kind_counts(kept) == {"a": 3, "b": 5}
    assert kept == balance(rows, {"a": 3, "b": 10}, seed=1)
    assert kind_counts(balance(rows, {"a": 3}, seed=1)) == {"a": 3}  # a kind without a quota is left out


def _build(corpus: list[Example], folder: Path, seed: int, steps: int = 3) -> dict:
    from apm_bench.tiny.corpus import write_corpus

    corpus_file = folder.parent / f"{folder.name}-corpus.jsonl"
    write_corpus(corpus, corpus_file)
    config = BuildConfig(seed=seed, shape=MINIATURE,
                         training=TrainingConfig(steps=steps, tokens_per_batch=2048, warmup=2, seed=seed))
    return build(config, folder, corpus_file)


def test_a_seed_rebuilds_the_same_bytes_and_another_seed_does_not(corpus: list[Example], tmp_path: Path) -> None:
    first = _build(corpus, tmp_path / "a", seed=3)
    again = _build(corpus, tmp_path / "b", seed=3)
    other = _build(corpus, tmp_path / "c", seed=4)
    assert first["checksum"] == again["checksum"] == checksum(tmp_path / "a")
    assert other["checksum"] != first["checksum"]
    assert verify(tmp_path / "a")["checksum"] == first["checksum"]


def test_training_lowers_the_loss_on_the_answers(corpus: list[Example]) -> None:
    from apm_bench.tiny.build import corpus_texts
    from apm_bench.tiny.model import new_model, train_tokenizer
    from apm_bench.tiny.training import train

    tokenizer = train_tokenizer(corpus_texts(corpus), MINIATURE.vocab_size)
    model = new_model(tokenizer, MINIATURE, seed=0)
    log = train(model, tokenizer, corpus, TrainingConfig(steps=60, tokens_per_batch=2048, warmup=5, learning_rate=5e-3))
    first, last = sum(log.losses[:10]) / 10, sum(log.losses[-10:]) / 10
    assert log.steps == 60 and log.left_out < len(corpus) // 4  # a 400-token vocabulary makes some RAG prompts too long
    assert last < first - 1.0, (first, last)


def test_a_changed_file_fails_verification_and_a_rebuild_replaces_the_folder_whole(
        corpus: list[Example], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _build(corpus, folder, seed=0)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its manifest"):
        verify(folder)
    _build(corpus, folder, seed=0)
    verify(folder)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["m"]


def test_the_shipped_model_matches_its_manifest_and_fits_the_size_limit() -> None:
    manifest = verify(bundled_folder())
    assert manifest["bytes"] < 10 * 2**20
    assert manifest["held_out_prompts"] == [p.id for p in held_out_prompts()[1]]
    assert BuildConfig.model_validate(manifest["build"]) == BuildConfig()  # the default build, as shipped


def test_the_alias_loads_the_shipped_folder_in_process_and_asks_a_server_by_name() -> None:
    spec = resolve_model("apm-tiny")
    assert spec.backend == "hf" and Path(spec.weights()) == bundled_folder()
    assert resolve_model("apm-tiny", "vllm").options() == {"dtype": "float32", "max_model_len": 2048}
    assert resolve_model("apm-tiny", "openai").options() == {}
    served = load_backend("apm-tiny", load_pool_catalog(RunConfig()), backend="openai",
                          options={"base_url": "http://127.0.0.1:9/v1"})
    assert served.model == "apm-tiny"


def test_apm_tiny_may_be_judged_by_the_simulator_without_the_override() -> None:
    check_roles(RunConfig(model="apm-tiny", candidate_model="apm-tiny"))
    with pytest.raises(ConfigError, match="would be simulated"):
        check_roles(RunConfig(model="./some/real-model", backend="hf", candidate_model="./some/real-model",
                              candidate_backend="hf"))


def test_a_role_on_the_generators_model_follows_its_engine_unless_given_its_own() -> None:
    moved = RunConfig(model="apm-tiny", backend="vllm", candidate_model="apm-tiny", judge_model="apm-tiny")
    assert (moved.candidate_backend, moved.judge_backend, moved.writer_backend) == ("vllm", "vllm", None)
    kept = RunConfig(model="apm-tiny", backend="vllm", candidate_model="apm-tiny", candidate_backend="hf")
    assert kept.candidate_backend == "hf"
    served = RunConfig(model="apm-tiny", backend="openai", base_url="http://h/v1", candidate_model="apm-tiny")
    assert (served.candidate_backend, served.candidate_url) == ("openai", "http://h/v1")


def test_the_behaviour_summary_averages_each_condition_and_counts_the_cued_side() -> None:
    import pandas as pd

    from apm_bench.tiny.behaviour import markdown, summarise

    scores = pd.DataFrame({
        "model": "m", "probe": "instruction", "principle": ["p", "p", "p", "q", "q", "q"],
        "condition": ["follow", "none", "avoid"] * 2, "score": [9.0, 5.0, 2.0, 4.0, 6.0, 7.0], "failed": False,
    })
    table = summarise(scores).set_index("principle")
    assert table.loc["p", "gap"] == 7.0 and table.loc["q", "gap"] == -3.0
    assert table.loc["all", "follow"] == 6.5 and table.loc["all", "right_side"] == 0.5
    assert "| **all** | 6.50 | 5.50 | 4.50 |" in markdown(summarise(scores), ["m"])




def test_bad_input_to_the_tiny_model_commands_is_one_error_line_before_any_work(tmp_path: Path) -> None:
    from test_cli import apm_inline

    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"kind": "plain"}\n')
    built = apm_inline("tiny-model", "build", "--corpus", bad, "--out", tmp_path / "model", cwd=tmp_path)
    assert built.returncode == 2 and built.stderr.startswith("error: ") and "corpus.jsonl:1" in built.stderr
    reported = apm_inline("tiny-model", "report", "--model", "apm-tinny", "--out", tmp_path / "report", cwd=tmp_path)
    assert reported.returncode == 2 and "Did you mean 'apm-tiny'" in reported.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # nothing written
