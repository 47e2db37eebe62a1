"""Routing diagnostics on hand-made samples: top targets, accuracies and the confusion table."""

from __future__ import annotations

import pandas as pd
import pytest

from apm_bench.judging.label_diagnostics import label_diagnostics, top_label, training_label_accuracy
from apm_bench.world.users import Target


def _targets(*items: tuple[str, str, float]) -> list[dict]:
    return [Target(principle=p, side=s, weight=w).model_dump() for p, s, w in items]  # type: ignore[arg-type]


def test_the_top_target_is_the_largest_absolute_weight_and_the_first_of_equals() -> None:
    assert top_label(_targets(("casual", "follow", 0.3), ("gentle", "avoid", -0.7))) == "avoid gentle"
    assert top_label(_targets(("casual", "follow", 0.5), ("gentle", "avoid", 0.5))) == "follow casual"


def test_accuracies_and_confusion_per_world_and_pooled() -> None:
    samples = pd.DataFrame({
        "method": ["routing"] * 4 + ["history"] * 2,
        "world": [0, 0, 1, 1, 0, 1],
        "routed_to": ["follow casual", "avoid gentle", "follow gentle", "avoid casual", None, None],
        "targets": [_targets(("casual", "follow", 1.0)), _targets(("gentle", "follow", 1.0)),
                    _targets(("gentle", "follow", 1.0)), _targets(("gentle", "avoid", 1.0))] + [_targets(("casual", "follow", 1.0))] * 2,
    })
    found = {(d.method, d.world): d for d in label_diagnostics(samples, [("routing", "0", 0.75, 8)])}
    assert set(found) == {("routing", "0"), ("routing", "1"), ("routing", "pooled")}
    world0, pooled = found[("routing", "0")], found[("routing", "pooled")]
    assert (world0.label_accuracy, world0.principle_accuracy) == (0.5, 1.0)
    assert (world0.training_label_accuracy, world0.training_users) == (0.75, 8)
    assert found[("routing", "1")].training_label_accuracy is None
    assert pooled.label_accuracy == pytest.approx(0.5) and pooled.principle_accuracy == pytest.approx(0.75)
    assert pooled.confusion == {"casual": {"casual": 1}, "gentle": {"casual": 1, "gentle": 2}}
    assert pooled.training_label_accuracy == pytest.approx(0.75) and pooled.training_users == 8


def test_training_labels_are_scored_only_for_users_with_targets() -> None:
    targets = {"a": [Target(principle="casual", side="follow", weight=1.0)], "b": []}
    assert training_label_accuracy({"a": "follow casual", "b": "avoid casual"}, targets) == (1.0, 1)
    assert label_diagnostics(pd.DataFrame({"method": ["x"], "world": [0]})) == []
