"""Methods without a real learning step: the baseline, the oracle upper bound, the prior, history in context."""

from __future__ import annotations

import numpy as np

from apm_bench.backends.base import Message, chat
from apm_bench.errors import UninformativeFeedbackError
from apm_bench.judging.candidates import StyleLabel
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.methods.base import FitContext, Personalization, Personalizer, UserView, register_method
from apm_bench.methods.context_budget import ContextBudget, trimmed_note
from apm_bench.world.catalog import Principle
from apm_bench.world.prompting import InstructionTexts, history_context, style_instruction
from apm_bench.world.users import Target


@register_method("baseline")
class Baseline(Personalizer):
    description = "No personalization: the prompt alone (every method is compared with this)."

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return Personalization(chat(prompt))


@register_method("oracle")
class Oracle(Personalizer):
    description = "Upper bound: the instruction for the user's true top target (evaluation only)."
    evaluation_only = True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._targets: dict[str, list[Target]] = {}
        self._principles: dict[str, Principle] = {}
        self._texts: InstructionTexts = "apm-bench"

    def fit(self, context: FitContext) -> None:
        self._principles = {p.id: p for p in context.principles}
        self._texts = context.texts

    def reveal_targets(self, targets: dict[str, list[Target]]) -> None:
        self._targets = targets

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        top = max(self._targets[user.id], key=lambda t: t.weight)
        return Personalization(chat(prompt, system=style_instruction(self._principles[top.principle], top.side, self._texts)))


@register_method("prior")
class Prior(Personalizer):
    description = "Reference: the one instruction that scores best on average over training users (reads no history)."

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._instruction: str | None = None
        self.chosen: str | None = None

    def fit(self, context: FitContext) -> None:
        """What any method could earn without reading a history: near 0 when the population is balanced."""
        scores = np.stack([context.feedback.scores(u.id) for u in context.train_users])
        counts = (~np.isnan(scores)).sum(axis=0)
        if not counts.any():
            raise UninformativeFeedbackError("prior", "no training user has a scorable candidate")
        means = np.where(counts > 0, np.nansum(scores, axis=0) / np.maximum(counts, 1), -np.inf)
        label = context.feedback.labels[int(np.argmax(means))]
        principles = {p.id: p for p in context.principles}
        self._instruction = style_instruction(principles[label.principle], label.side, context.texts)
        self.chosen = f"{label.side} {label.principle}"

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        if self._instruction is None:
            raise RuntimeError("prior must be fitted before it personalizes")
        return Personalization(chat(prompt, system=self._instruction), notes={"routed_to": str(self.chosen)})


@register_method("history")
class HistoryInContext(Personalizer):
    description = "The user's raw history in the system prompt (the obvious in-context baseline)."

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._budget = ContextBudget()

    def fit(self, context: FitContext) -> None:
        self._budget = context.budget

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        if not user.history:
            return Personalization(chat(prompt))

        def build(history: tuple[str, ...]) -> tuple[Message, ...]:
            return chat(prompt, system=history_context(list(history))) if history else chat(prompt)

        trimmed = self._budget.newest(user.history, build)
        return Personalization(trimmed.messages, notes=trimmed_note(trimmed.dropped))


@register_method("oracle-router")
class OracleRouter(Personalizer):
    description = ("Upper bound as the paper defines it: a perfect router, giving each test user the instruction "
                   "whose candidate the judge scored best for them (evaluation only).")
    evaluation_only = True
    needs_test_feedback = True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._feedback: FeedbackOracle | None = None
        self._principles: list[Principle] = []
        self._texts: InstructionTexts = "apm-bench"
        #: test user id → the label chosen for them ("follow casual")
        self.chosen: dict[str, str] = {}

    def reveal_targets(self, targets: dict[str, list[Target]]) -> None:
        """Its choice comes from the judge's scores of the user's candidates, not from the targets."""

    def reveal_feedback(self, feedback: FeedbackOracle) -> None:
        self._feedback = feedback

    def fit(self, context: FitContext) -> None:
        self._principles, self._texts = list(context.principles), context.texts

    def best_label(self, user_id: str) -> StyleLabel:
        """The authors' search: principles in pool order, follow before avoid, the first strict
        maximum; with no scorable candidate, the first principle followed."""
        if self._feedback is None:
            raise RuntimeError("oracle-router needs the test users' feedback before it personalizes")
        scores = self._feedback.scores(user_id)
        labels = list(self._feedback.labels)
        best, best_score = StyleLabel(self._principles[0].id, "follow"), -np.inf
        for principle in self._principles:
            for side in ("follow", "avoid"):
                label = StyleLabel(principle.id, side)
                score = scores[labels.index(label)]
                if not np.isnan(score) and score > best_score:
                    best, best_score = label, score
        return best

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        label = self.best_label(user.id)
        self.chosen[user.id] = f"{label.side} {label.principle}"
        principle = next(p for p in self._principles if p.id == label.principle)
        return Personalization(chat(prompt, system=style_instruction(principle, label.side, self._texts)),
                               notes={"routed_to": self.chosen[user.id]})
