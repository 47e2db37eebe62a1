"""RAG: show the generator how users with similar histories liked to be answered.

At fit time every training user's best- and worst-rated candidate (by the feedback oracle) is
indexed under their history embedding. At test time the k nearest training users by cosine
similarity are retrieved and their (prompt, best response, worst response) go into the system
prompt. Only a model that imitates examples well can turn this into a personalized answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from apm_bench.backends.base import Message, chat
from apm_bench.errors import UninformativeFeedbackError
from apm_bench.methods.base import FitContext, MethodOptions, Personalization, Personalizer, UserView, register_method
from apm_bench.methods.context_budget import ContextBudget, trimmed_note
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.world.prompting import PAPER_RAG_SYSTEM, InstructionTexts, example_block, history_block

if TYPE_CHECKING:
    from sklearn.neighbors import NearestNeighbors

RAG_INSTRUCTION = (
    "The examples below come from users whose earlier messages resemble this user's. Each shows a "
    "request, the response that user rated best and, where given, the one they rated worst. Answer "
    "the new message in the style that users like this one appear to prefer. Do not mention the examples."
)


def examples_system_prompt(blocks: list[str], texts: InstructionTexts = "apm-bench") -> str:
    """RAG's system prompt around its example blocks, in apm-bench's or the authors' words."""
    if texts == "paper":
        return PAPER_RAG_SYSTEM.format(examples="\n".join(blocks))
    return RAG_INSTRUCTION + "\n\n<examples>\n" + "\n".join(blocks) + "\n</examples>"


@dataclass(frozen=True)
class _Example:
    user_id: str
    prompt: str
    best: str
    worst: str
    history: tuple[str, ...]


class RagOptions(MethodOptions):
    k: int = Field(default=3, ge=1, description="neighbours retrieved per test user")
    include_worst: bool = Field(default=True, description="also show each neighbour's worst-rated response")
    include_history: bool = Field(default=False, description="also show an excerpt of each neighbour's history")
    history_excerpt: int = Field(default=2, ge=1, description="messages per neighbour history excerpt")
    neighbours: Literal["nearest", "random"] = Field(
        default="nearest", description="'random' is the retrieval ablation: same prompt, unrelated users"
    )


@register_method("rag")
class Rag(Personalizer):
    description = "Retrieve the k most similar training users; show their best/worst rated responses as examples."
    Options = RagOptions
    options: RagOptions

    def embeds_histories(self) -> bool:
        return True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._examples: list[_Example] = []
        self._index: NearestNeighbors | None = None  # scikit-learn loads when an index is built
        self._embedder: HistoryEmbedder | None = None
        self._rng = np.random.default_rng(0)
        self._budget = ContextBudget()
        self._texts: InstructionTexts = "apm-bench"

    def fit(self, context: FitContext) -> None:
        self._embedder, self._budget, self._texts = context.embedder, context.budget, context.texts
        self._rng = np.random.default_rng([context.seed, 0x7A6])
        examples = []
        for user in context.train_users:
            scores = context.feedback.scores(user.id)
            if np.all(np.isnan(scores)) or np.nanmax(scores) == np.nanmin(scores):
                continue  # nothing to tell best from worst
            candidates = context.feedback.candidates(user.id)
            best, worst = candidates[int(np.nanargmax(scores))], candidates[int(np.nanargmin(scores))]
            examples.append(_Example(user.id, user.prompt, best.text, worst.text, user.history))
        if not examples:
            raise UninformativeFeedbackError("rag", "no training user has candidates the feedback tells apart")
        self._examples = examples
        vectors = context.embedder.embed_histories([e.history for e in examples])
        from sklearn.neighbors import NearestNeighbors
        self._index = NearestNeighbors(n_neighbors=min(self.options.k, len(examples)), metric="cosine").fit(vectors)

    def neighbours(self, histories: Sequence[Sequence[str]]) -> list[list[str]]:
        """Ids of the retrieved training users, most similar first."""
        return [[self._examples[i].user_id for i in row] for row in self._retrieve(histories)]

    def _retrieve(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        if self._index is None or self._embedder is None:
            raise RuntimeError("rag must be fitted before it personalizes")
        k = min(self.options.k, len(self._examples))
        if self.options.neighbours == "random":
            return np.stack([self._rng.choice(len(self._examples), size=k, replace=False) for _ in histories])
        _, indices = self._index.kneighbors(self._embedder.embed_histories(histories), n_neighbors=k)
        return indices

    def _system_prompt(self, examples: list[_Example]) -> str:
        blocks = []
        for example in examples:
            block = example_block(example.prompt, example.best, example.worst if self.options.include_worst else None)
            if self.options.include_history and example.history:
                excerpt = history_block(list(example.history[: self.options.history_excerpt]))
                block = f"<similar_user_history>\n{excerpt}\n</similar_user_history>\n{block}"
            blocks.append(block)
        return examples_system_prompt(blocks, self._texts)

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        rows = self._retrieve([u.history for u in users])
        return [self._with_examples(prompt, [self._examples[i] for i in row]) for prompt, row in zip(prompts, rows)]

    def _with_examples(self, prompt: str, examples: list[_Example]) -> Personalization:
        """As many of the examples as the context holds, the least similar dropped first."""

        def build(k: int) -> tuple[Message, ...]:
            return chat(prompt, system=self._system_prompt(examples[:k])) if k else chat(prompt)

        trimmed = self._budget.largest(build, len(examples))
        return Personalization(trimmed.messages, notes=trimmed_note(trimmed.dropped))
