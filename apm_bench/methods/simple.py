"""Methods without a learning step: the baseline, the oracle upper bound, history in context."""

from __future__ import annotations

from apm_bench.backends.base import chat
from apm_bench.methods.base import FitContext, Personalization, Personalizer, UserView, register_method
from apm_bench.world.catalog import Principle
from apm_bench.world.prompting import history_context, style_instruction
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

    def fit(self, context: FitContext) -> None:
        self._principles = {p.id: p for p in context.principles}

    def reveal_targets(self, targets: dict[str, list[Target]]) -> None:
        self._targets = targets

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        top = max(self._targets[user.id], key=lambda t: t.weight)
        return Personalization(chat(prompt, system=style_instruction(self._principles[top.principle], top.side)))


@register_method("history")
class HistoryInContext(Personalizer):
    description = "The user's raw history in the system prompt (the obvious in-context baseline)."

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        if not user.history:
            return Personalization(chat(prompt))
        return Personalization(chat(prompt, system=history_context(list(user.history))))
