"""Routing's logistic classifier as arrays: the same probabilities as scikit-learn's, kept and reloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.linear_router import LinearRouter, fit_logistic
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark


@pytest.mark.parametrize("n_labels", [1, 2, 5])
def test_its_probabilities_are_scikit_learns_and_survive_a_reload(n_labels: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(n_labels)
    features = rng.normal(size=(80, 6)) * rng.uniform(0.5, 3, size=6) + 2
    labels = (features[:, 0] * 2 + rng.normal(size=80)).argsort().argsort() * n_labels // 80
    targets = np.eye(max(n_labels, 2))[labels][:, :n_labels] if n_labels > 1 else np.ones((80, 1))
    router = fit_logistic(features, targets, strength=0.5, seed=0)
    router.save(tmp_path)
    reloaded = LinearRouter.load(tmp_path)
    test = rng.normal(size=(30, 6)) * 2 + 2
    assert np.array_equal(router.predict_proba(test), reloaded.predict_proba(test))
    if n_labels == 1:
        assert list(router.classes_) == [0] and np.all(router.predict_proba(test) == 1)
        return
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, random_state=0)).fit(features, labels)
    assert np.allclose(router.predict_proba(test), reference.predict_proba(test), atol=1e-9)
    assert list(router.classes_) == list(reference.classes_)


def test_a_rerun_routes_from_the_kept_classifier_without_refitting(embedder: HistoryEmbedder, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = RunConfig(methods=["routing"], worlds=[0, 1], users=80, history_len=3, bootstrap_resamples=200,
                       cache=str(tmp_path / "calls.sqlite"), out=tmp_path / "runs")
    first = run_benchmark(config, embedder=embedder)
    kept = sorted(p.name for p in (tmp_path / "artifacts").glob("routing-logistic-*"))
    assert len(kept) == 2, "one kept classifier per world"

    def refit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rerun on the same inputs must not refit")

    monkeypatch.setattr("apm_bench.methods.routing.fit_logistic", refit)
    second = run_benchmark(config, embedder=embedder)
    assert list(second.samples["routed_to"]) == list(first.samples["routed_to"])
    assert [m.delta for m in second.metrics] == [m.delta for m in first.metrics]
    changed = config.model_copy(update={"method_options": {"routing": {"regularisation": [0.05]}}})
    monkeypatch.undo()
    run_benchmark(changed, embedder=embedder)
    assert len(list((tmp_path / "artifacts").glob("routing-logistic-*"))) == 4, "other options fit anew"


def test_routing_predicts_without_importing_scikit_learn() -> None:
    code = ("import sys, numpy as np; from apm_bench.methods.routing import Routing; "
            "from apm_bench.methods.linear_router import LinearRouter; "
            "r = LinearRouter(np.arange(3), np.zeros(2), np.ones(2), np.eye(3, 2), np.zeros(3)); "
            "r.predict_proba(np.ones((4, 2))); print('sklearn' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"
