"""Routing's fine-tuned text classifier (the paper's routing) on a tiny random BERT built locally."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apm_bench.errors import ConfigError
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.text_classifier import FineTunedClassifier, FinetuneSettings
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from tiny_lm import build_tiny_encoder

FAST = dict(epochs=8, learning_rate=3e-3, batch_size=4, grad_accum=1, max_length=64)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder"))


def _texts(word: str, n: int) -> list[str]:
    return [f"<prompt>please {word} the report number {i}</prompt>" for i in range(n)]


def test_it_learns_hard_labels_and_a_reload_predicts_the_same(encoder: Path, tmp_path: Path) -> None:
    texts = _texts("shorten", 12) + _texts("expand", 12)
    targets = np.repeat(np.eye(2), 12, axis=0)
    classifier = FineTunedClassifier(FinetuneSettings(encoder=str(encoder), **FAST), n_labels=2, seed=1)
    record = classifier.fit(texts, targets)
    assert record.losses[-1] < 0.5 * record.losses[0]
    assert record.steps == FAST["epochs"] * 6  # 24 texts in batches of 4, one step per batch
    held_out = ["<prompt>please shorten the report number 57</prompt>", "<prompt>please expand the report number 57</prompt>"]
    probabilities = classifier.predict_proba(held_out)
    assert list(np.argmax(probabilities, axis=1)) == [0, 1]
    classifier.save(tmp_path)
    again = FineTunedClassifier.load(tmp_path)
    np.testing.assert_allclose(again.predict_proba(held_out), probabilities, atol=1e-5)


def test_soft_labels_are_learned_as_distributions(encoder: Path) -> None:
    """The regression strategy's soft targets: the classifier's probabilities approach them."""
    texts = _texts("summarise", 16)
    targets = np.tile([0.7, 0.2, 0.1], (16, 1))
    classifier = FineTunedClassifier(FinetuneSettings(encoder=str(encoder), **FAST), n_labels=3, seed=0)
    classifier.fit(texts, targets)
    np.testing.assert_allclose(classifier.predict_proba(texts[:4]).mean(axis=0), [0.7, 0.2, 0.1], atol=0.08)


def test_gradient_accumulation_steps_the_optimiser_once_per_group(encoder: Path) -> None:
    settings = FinetuneSettings(encoder=str(encoder), epochs=1, batch_size=2, grad_accum=4, max_length=32)
    record = FineTunedClassifier(settings, n_labels=2).fit(_texts("shorten", 10), np.tile([1.0, 0.0], (10, 1)))
    assert (len(record.losses), record.steps) == (5, 2)  # 5 batches: one step after 4, one for the remainder


def test_an_unknown_encoder_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="cannot load encoder '/nonexistent/encoder'"):
        FineTunedClassifier(FinetuneSettings(encoder="/nonexistent/encoder"), n_labels=2).fit(["a"], np.ones((1, 2)))


def test_routing_with_the_finetuned_classifier_runs_end_to_end_and_reuses_its_weights(
    encoder: Path, embedder: HistoryEmbedder, tmp_path: Path
) -> None:
    options = {"routing": {"classifier": "finetune", "finetune": {**FAST, "epochs": 2, "encoder": str(encoder)}}}
    config = RunConfig(methods=["routing"], worlds=[0], users=120, history_len=2, bootstrap_resamples=200,
                       method_options=options, cache=str(tmp_path / "calls.sqlite"))
    first = run_benchmark(config, embedder=embedder)
    [trained] = [t for t in first.training if t["method"] == "routing"]
    assert not trained["reused"] and trained["steps"] > 0 and trained["losses"]
    routed = first.samples[first.samples["method"] == "routing"]
    assert routed["routed_to"].notna().all() and routed["system_prompt"].str.len().gt(0).all()
    second = run_benchmark(config, embedder=embedder)
    [reused] = [t for t in second.training if t["method"] == "routing"]
    assert reused["reused"] and reused["steps"] == 0
    assert list(second.samples["routed_to"]) == list(first.samples["routed_to"])
