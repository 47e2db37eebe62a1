"""Routing: predict the best (principle, side) from the history, then instruct the generator.

Each training user gets a label from their candidates' scores (the label strategy), a classifier
learns history embedding → label, and at test time the predicted label becomes the FOLLOW/AVOID
instruction. The classifier's regularisation is chosen on validation users by the reward their
predicted labels would earn, i.e. by what the benchmark measures.

`classifier: finetune` is the paper's routing instead: a text encoder (ModernBERT-base by default)
fully fine-tuned on the tagged history (`methods/text_classifier.py`); its weights are kept in the
artifact store, so a resumed run loads them instead of training again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from apm_bench.backends.base import chat
from apm_bench.cache import cache_key
from apm_bench.errors import UninformativeFeedbackError
from apm_bench.judging.judge import SCORE_MIDPOINT
from apm_bench.methods.base import (
    FitContext,
    FitUser,
    MethodOptions,
    Personalization,
    Personalizer,
    UserView,
    register_method,
)
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.linear_router import LinearRouter, fit_logistic
from apm_bench.methods.text_classifier import FineTunedClassifier, FinetuneSettings
from apm_bench.world.catalog import Principle, Side
from apm_bench.world.prompting import InstructionTexts, history_block, style_instruction

if TYPE_CHECKING:  # torch loads only when a model trains
    from apm_bench.methods.training import TrainingRecord

LabelStrategy = Literal["abs", "abs_two_sided", "margin", "regression"]
LABEL_STRATEGIES: tuple[str, ...] = ("abs", "abs_two_sided", "margin", "regression")


def label_distribution(scores: np.ndarray, strategy: str, temperature: float = 1.0) -> np.ndarray | None:
    """A distribution over the 2P labels (one-hot for hard strategies); None if nothing is scored.

    `scores` lists the follow candidates of every principle, then the avoid candidates.
    """
    if np.all(np.isnan(scores)):
        return None
    n = scores.size // 2
    follow, avoid = scores[:n], scores[n:]
    target = np.zeros(scores.size)
    if strategy == "abs":
        centred = np.where(np.isnan(follow), 0.0, follow - SCORE_MIDPOINT)
        i = int(np.argmax(np.abs(centred)))
        target[i if centred[i] >= 0 else n + i] = 1.0
    elif strategy == "abs_two_sided":
        target[int(np.nanargmax(scores))] = 1.0
    elif strategy == "margin":
        margin = np.where(np.isnan(follow) | np.isnan(avoid), 0.0, follow - avoid)
        i = int(np.argmax(np.abs(margin)))
        target[i if margin[i] > 0 else n + i] = 1.0
    elif strategy == "regression":
        logits = np.where(np.isnan(scores), -np.inf, scores / temperature)
        weights = np.exp(logits - np.max(logits))
        target = weights / weights.sum()
    else:
        raise ValueError(f"unknown label strategy {strategy!r}")
    return target


class RoutingOptions(MethodOptions):
    label_strategy: LabelStrategy = "margin"
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature of the regression strategy")
    classifier: Literal["logistic", "finetune"] = Field(
        default="logistic",
        description="'logistic': logistic regression on the frozen φ (the CPU default); 'finetune': the paper's "
        "fully fine-tuned encoder on the tagged history (settings under `finetune`)",
    )
    regularisation: tuple[float, ...] = Field(default=(0.01, 0.03, 0.1), min_length=1, description="inverse L2 strengths tried")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, description="the fine-tuned classifier's settings")


@register_method("routing")
class Routing(Personalizer):
    description = "Classify the history into a (principle, side) label and instruct the generator (APM's best method)."
    Options = RoutingOptions
    options: RoutingOptions

    def embeds_histories(self) -> bool:
        return self.options.classifier != "finetune"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._classifier: LinearRouter | None = None
        self._principles: list[Principle] = []
        self._embedder: HistoryEmbedder | None = None
        self._texts: InstructionTexts = "apm-bench"
        self.selected_regularisation: float | None = None
        self._training_labels: dict[str, str] = {}
        self._finetuned: FineTunedClassifier | None = None
        self._record: TrainingRecord | None = None

    def fit(self, context: FitContext) -> None:
        self._principles = list(context.principles)
        self._texts = context.texts
        self._embedder = context.embedder
        users, targets = self._labelled(context.train_users, context)
        self._training_labels = {u.id: self._label_name(int(np.argmax(t))) for u, t in zip(users, targets)}
        if self.options.classifier == "finetune":
            self._fit_finetuned(users, targets, context)
            return
        features = context.embedder.embed_histories([u.history for u in users])
        validation = list(context.validation_users)
        validation_scores = np.stack([context.feedback.scores(u.id) for u in validation]) if validation else None
        validation_features = context.embedder.embed_histories([u.history for u in validation]) if validation else None
        key = "routing-logistic-" + cache_key(
            "routing-logistic", context.seed, self.options.model_dump(exclude={"finetune"}), _digest(features),
            _digest(targets), _digest(validation_features), _digest(validation_scores))[:20]
        found = context.artifacts.find(key) if context.artifacts is not None else None
        if found is not None:  # fitted before on exactly these inputs: a rerun loads it
            self._classifier = LinearRouter.load(found)
            self.selected_regularisation = float(np.load(found / "selected.npy"))
            return
        best: tuple[float, float, LinearRouter] | None = None
        for strength in self.options.regularisation:
            classifier = fit_logistic(features, targets, strength, context.seed)
            if validation_scores is None or validation_features is None:
                best = (0.0, strength, classifier)
                break
            predicted = self._predict(classifier, validation_features)
            value = float(np.nanmean(validation_scores[np.arange(len(validation)), predicted]))
            if best is None or value > best[0]:
                best = (value, strength, classifier)
        assert best is not None
        _, self.selected_regularisation, self._classifier = best
        if context.artifacts is not None:
            with context.artifacts.writing(key) as staging:
                self._classifier.save(staging)
                np.save(staging / "selected.npy", np.float64(self.selected_regularisation))

    def _fit_finetuned(self, users: Sequence[FitUser], targets: np.ndarray, context: FitContext) -> None:
        """Train (or find in the artifact store) the encoder fine-tuned on these users' labels."""
        texts = [history_block(list(u.history)) for u in users]
        settings = self.options.finetune
        key = "routing-classifier-" + cache_key("routing-classifier", context.seed, settings.model_dump(), texts,
                                                np.round(targets, 6).tolist())[:20]
        from apm_bench.methods.training import TrainingRecord

        found = context.artifacts.find(key) if context.artifacts is not None else None
        if found is not None:
            self._finetuned = FineTunedClassifier.load(found)
            self._record = TrainingRecord(name=key, examples=len(texts), reused=True)
            return
        classifier = FineTunedClassifier(settings, targets.shape[1], seed=context.seed)
        self._record = dataclasses.replace(classifier.fit(texts, targets, context.report), name=key)
        if context.artifacts is not None:
            with context.artifacts.writing(key) as staging:
                classifier.save(staging)
        self._finetuned = classifier

    def training_records(self) -> list[TrainingRecord]:
        return [self._record] if self._record is not None else []

    def _labelled(self, users: Sequence[FitUser], context: FitContext) -> tuple[list[FitUser], np.ndarray]:
        kept, rows = [], []
        for user in users:
            target = label_distribution(context.feedback.scores(user.id), self.options.label_strategy, self.options.temperature)
            if target is not None:
                kept.append(user)
                rows.append(target)
        if not kept:
            raise UninformativeFeedbackError("routing", "no training user has a scorable candidate")
        return kept, np.stack(rows)

    @staticmethod
    def _predict(classifier: LinearRouter, features: np.ndarray) -> np.ndarray:
        return classifier.classes_[np.argmax(classifier.predict_proba(features), axis=1)].astype(int)

    def predict_labels(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        if self._finetuned is not None:
            return np.argmax(self._finetuned.predict_proba([history_block(list(h)) for h in histories]), axis=1)
        if self._classifier is None or self._embedder is None:
            raise RuntimeError("routing must be fitted before it personalizes")
        return self._predict(self._classifier, self._embedder.embed_histories(histories))

    def training_labels(self) -> dict[str, str]:
        return dict(self._training_labels)

    def _side(self, label: int) -> Side:
        return "follow" if label < len(self._principles) else "avoid"

    def _label_name(self, label: int) -> str:
        return f"{self._side(label)} {self._principles[label % len(self._principles)].id}"

    def _instruction(self, label: int) -> str:
        principle = self._principles[label % len(self._principles)]
        return style_instruction(principle, self._side(label), self._texts)

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        labels = self.predict_labels([u.history for u in users])
        return [Personalization(chat(p, system=self._instruction(int(l))), notes={"routed_to": self._label_name(int(l))})
                for p, l in zip(prompts, labels)]


def _digest(values: np.ndarray | None) -> str:
    """A fingerprint of an array's exact bytes: the fit is reused only for bit-identical inputs."""
    if values is None:
        return "none"
    array = np.ascontiguousarray(values)
    return f"{array.dtype}{array.shape}" + hashlib.sha256(array.tobytes()).hexdigest()
