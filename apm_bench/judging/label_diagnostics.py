"""Routing diagnostics: did a router pick the label the user actually wanted?

Δ says whether routing helped; it does not say why it fell short. A router can fail because the
judge-derived training labels are wrong (the authors log this as "JUDGE ACC") or because the
classifier cannot read the label from a history ("TEST ACC"). Both are measured against the
user's true top target, the target with the largest |weight|, and only after the method has
predicted: the runner reads targets for this report, never for the method.

A method takes part by recording the instruction it chose as the sample note `routed_to`
("follow casual"); routing, oracle-router and prior do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
from pydantic import BaseModel

from apm_bench.world.users import Target


class LabelDiagnostics(BaseModel):
    """One method in one world (or pooled): how often its chosen label matches the true top target."""

    method: str
    world: str  # a world seed, or "pooled"
    n_users: int
    #: predicted (principle, side) equals the top target's
    label_accuracy: float
    #: predicted principle equals the top target's, whatever the side
    principle_accuracy: float
    #: the labels the method derived from the judge's feedback for its training users, against
    #: those users' true top targets (None where the method derives no training labels)
    training_label_accuracy: float | None = None
    training_users: int = 0
    #: true top principle → predicted principle → users
    confusion: dict[str, dict[str, int]] = {}


def top_label(targets: Sequence[Target] | Sequence[Mapping[str, object]]) -> str:
    """ "side principle" of the target with the largest |weight| (the first of equals)."""
    rows = [t.model_dump() if isinstance(t, Target) else dict(t) for t in targets]
    top = max(rows, key=lambda t: abs(float(t["weight"])))  # type: ignore[arg-type]
    return f"{top['side']} {top['principle']}"


def _principle(label: str) -> str:
    return label.split(" ", 1)[1]


def _diagnose(method: str, world: str, chosen: Sequence[str], truth: Sequence[str]) -> LabelDiagnostics:
    confusion: dict[str, dict[str, int]] = {}
    for predicted, true in zip(chosen, truth):
        row = confusion.setdefault(_principle(true), {})
        row[_principle(predicted)] = row.get(_principle(predicted), 0) + 1
    n = len(chosen)
    return LabelDiagnostics(
        method=method,
        world=world,
        n_users=n,
        label_accuracy=sum(p == t for p, t in zip(chosen, truth)) / n,
        principle_accuracy=sum(_principle(p) == _principle(t) for p, t in zip(chosen, truth)) / n,
        confusion={k: dict(sorted(v.items())) for k, v in sorted(confusion.items())},
    )


def training_label_accuracy(labels: Mapping[str, str], targets: Mapping[str, Sequence[Target]]) -> tuple[float, int]:
    """Share of training users whose feedback-derived label is their true top label."""
    scored = [uid for uid in labels if targets.get(uid)]
    if not scored:
        return float("nan"), 0
    return sum(labels[uid] == top_label(targets[uid]) for uid in scored) / len(scored), len(scored)


def label_diagnostics(
    samples: pd.DataFrame, training: Iterable[tuple[str, str, float, int]] = ()
) -> list[LabelDiagnostics]:
    """Per world and pooled, for every method whose samples carry `routed_to`.

    `training` holds (method, world, accuracy, users) of the training labels, from the runner.
    """
    if "routed_to" not in samples.columns:
        return []
    routed = samples.dropna(subset=["routed_to"])
    by_key = {(m, w): (acc, n) for m, w, acc, n in training}
    results: list[LabelDiagnostics] = []
    for method, rows in routed.groupby("method", sort=False):
        truth = rows["targets"].map(top_label)
        for world, index in rows.groupby("world", sort=True).groups.items():
            entry = _diagnose(str(method), str(world), list(rows.loc[index, "routed_to"]), list(truth.loc[index]))
            acc, n = by_key.get((str(method), str(world)), (None, 0))
            results.append(entry.model_copy(update={"training_label_accuracy": acc, "training_users": n}))
        pooled = _diagnose(str(method), "pooled", list(rows["routed_to"]), list(truth))
        worlds = [by_key[(str(method), str(w))] for w in rows["world"].unique() if (str(method), str(w)) in by_key]
        if worlds:
            users = sum(n for _, n in worlds)
            pooled = pooled.model_copy(update={
                "training_label_accuracy": sum(a * n for a, n in worlds) / max(users, 1), "training_users": users})
        results.append(pooled)
    return results
