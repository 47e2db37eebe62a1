"""C-BPO: LoRA adapters trained with a positive-unlabeled preference objective (seed 000).

One adapter per routing label. For label ℓ the target users are the training users whose feedback
gives them label ℓ; positives are their best-rated responses, and the auxiliary (unlabeled) set is
the best-rated responses of every other training user. Some auxiliary users like what the target
users like, so treating the auxiliary set as plain negatives would punish shared good behaviour;
C-BPO subtracts that share, π_p, estimated by a classifier that tells target from auxiliary users'
histories (`training.estimate_positive_prior`). Test users are routed to an adapter by the routing
classifier; a label with too few training users gets no adapter, and its users get the plain prompt.

`cbpo-uncorrected` trains on exactly the same data with π_p = 0 (auxiliary = negatives): the
control that shows whether the correction, not the extra data, carries the effect.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from apm_bench.backends.base import AdapterRef, chat
from apm_bench.judging.candidates import StyleLabel
from apm_bench.methods.base import (
    FitContext,
    FitUser,
    MethodOptions,
    Personalization,
    Personalizer,
    UserView,
    register_method,
)
from apm_bench.methods.routing import LabelStrategy, Routing, label_distribution
from apm_bench.methods.trained import (
    artifact_key,
    existing_artifacts,
    history_features,
    ranked_candidates,
    trainer,
    training_request,
)
from apm_bench.methods.training import (
    CbpoSettings,
    Example,
    TrainingRecord,
    estimate_positive_prior,
    train_cbpo,
    with_references,
)

LABELS_FILE = "labels.json"


class CbpoOptions(MethodOptions):
    correction: bool = Field(default=True, description="subtract the positive bias (False: the uncorrected control)")
    clamp: bool = Field(default=True, description="max(0, ·) on the corrected negative risk")
    prior: float | None = Field(default=None, ge=0, lt=1, description="fixed π_p; None = estimate it from histories")
    label_strategy: LabelStrategy = "margin"
    positives_per_user: int = Field(default=1, ge=1, description="a user's best k candidates count as rated well")
    min_users: int = Field(default=3, ge=1, description="labels with fewer training users get no adapter")
    rank: int = Field(default=8, ge=1, description="LoRA rank")
    beta: float = Field(default=0.5, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="of the running mean subtracted from g")
    epochs: int = Field(default=10, ge=1, description="few: the loss has no KL term, long training overshoots")
    learning_rate: float = Field(default=0.02, gt=0)
    batch_size: int = Field(default=64, ge=1)
    artifacts: Path | None = Field(default=None, description="serve trained adapters from this folder instead of training")


def label_folder(label: StyleLabel) -> str:
    return f"{label.side}-{label.principle}"


@register_method("cbpo")
class Cbpo(Personalizer):
    description = "C-BPO: per-routing-label LoRA adapters trained with the positive-unlabeled objective."
    Options = CbpoOptions
    options: CbpoOptions

    def embeds_histories(self) -> bool:
        return True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.router = Routing(label_strategy=self.options.label_strategy)
        self.adapters: dict[int, AdapterRef] = {}
        self.priors: dict[int, float] = {}
        self.records: list[TrainingRecord] = []

    def training_records(self) -> list[TrainingRecord]:
        return list(self.records)

    # ------------------------------------------------------------------ fit

    def fit(self, context: FitContext) -> None:
        self.router.fit(context)
        labelled = self._user_labels(context)
        labels = [label for _, label in labelled]
        given = existing_artifacts(self.name, self.options.artifacts)
        if given is not None:
            self._load(given, "cbpo-" + given.name, context)
            return
        groups = [(user, ranked_candidates(context, user)[: self.options.positives_per_user]) for user, _ in labelled]
        options = self.options.model_dump(mode="json", exclude={"artifacts"})
        key = artifact_key(self.name, context, options, sorted((u.id, u.history, tuple(r)) for u, r in groups) + [labels])
        found = context.artifacts.find(key) if context.artifacts is not None else None
        if found is not None:
            self._load(found, key, context)
            self.records = [TrainingRecord(name=f"{key}-{n}", reused=True) for n in json.loads((found / LABELS_FILE).read_text())]
            return
        engine = trainer(self.name, context)
        self._train_all(engine, key, groups, labels, context)
        if context.artifacts is not None:
            with context.artifacts.writing(key) as staging:
                names = {}
                for label, adapter in self.adapters.items():
                    folder = label_folder(context.feedback.labels[label])
                    engine.save_adapter(adapter.name, staging / folder)
                    names[folder] = self.priors[label]
                (staging / LABELS_FILE).write_text(json.dumps(names, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            self._load(context.artifacts.root / key, key, context)

    def _user_labels(self, context: FitContext) -> list[tuple[FitUser, int]]:
        """Each training user's label from their own feedback (the label the router learns)."""
        labelled = []
        for user in context.train_users:
            target = label_distribution(context.feedback.scores(user.id), self.options.label_strategy)
            if target is not None:
                labelled.append((user, int(np.argmax(target))))
        return labelled

    def _train_all(self, engine: Any, key: str, groups: list[tuple[FitUser, list[str]]], labels: list[int], context: FitContext) -> None:
        counts = np.bincount(labels, minlength=len(context.feedback.labels))
        trained = [int(l) for l in np.flatnonzero(counts >= self.options.min_users)]
        if not trained:
            return
        features = history_features(context, [u for u, _ in groups])
        examples = [[Example(training_request(u.prompt), r) for r in responses] for u, responses in groups]
        referenced = iter(with_references(engine, [e for row in examples for e in row]))
        examples = [[next(referenced) for _ in row] for row in examples]
        for label in trained:
            inside = np.asarray(labels) == label
            target = [e for row, chosen in zip(examples, inside) if chosen for e in row]
            auxiliary = [e for row, chosen in zip(examples, inside) if not chosen for e in row]
            if not auxiliary:
                continue
            prior = self._prior(features[inside], features[~inside], context.seed)
            name = f"{key}-{label_folder(context.feedback.labels[label])}"
            engine.create_adapter(name, rank=self.options.rank, seed=context.seed)
            o = self.options
            settings = CbpoSettings(epochs=o.epochs, learning_rate=o.learning_rate, batch_size=o.batch_size, seed=context.seed,
                                    beta=o.beta, positive_prior=prior, clamp=o.clamp, momentum=o.momentum)
            self.records.append(train_cbpo(engine, name, target, auxiliary, settings, context.report))
            self.adapters[label] = AdapterRef(name)
            self.priors[label] = prior

    def _prior(self, target: np.ndarray, auxiliary: np.ndarray, seed: int) -> float:
        if not self.options.correction:
            return 0.0
        if self.options.prior is not None:
            return self.options.prior
        return estimate_positive_prior(target, auxiliary, seed)

    def _load(self, folder: Path, key: str, context: FitContext) -> None:
        """Adapters from a finished folder (label folder name → π_p in labels.json)."""
        saved = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
        self.adapters, self.priors = {}, {}
        for index, label in enumerate(context.feedback.labels):
            if label_folder(label) in saved:
                self.adapters[index] = AdapterRef(f"{key}-{label_folder(label)}", str(folder / label_folder(label)))
                self.priors[index] = float(saved[label_folder(label)])

    # ------------------------------------------------------------------ personalize

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        labels = self.router.predict_labels([u.history for u in users])
        return [Personalization(chat(p), adapter=self.adapters.get(int(l))) for p, l in zip(prompts, labels)]


@register_method("cbpo-uncorrected")
class CbpoUncorrected(Cbpo):
    description = "C-BPO's control: the same adapters and data, auxiliary responses taken as plain negatives (π_p = 0)."

    def __init__(self, **options: object) -> None:
        super().__init__(**{"correction": False, **options})
