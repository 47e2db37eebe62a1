"""rag-advanced, the APM authors' second RAG variant: retrieve on descriptions, show preferences.

`rag` retrieves on history embeddings and shows the neighbours' raw responses. rag-advanced asks
the generator to do the reading instead:

- fit: for every training user whose feedback tells candidates apart, the generator writes a short
  "vibe" description of the history (the retrieval key) and a preference description of their
  (prompt, best, worst) triple (the value); the vibes are embedded with φ;
- test: the generator writes the test user's vibe, the k nearest training vibes by cosine
  similarity are found, and their preference descriptions go into the system prompt.

The generator's context never holds another user's history or responses, only short texts, so it
suits models that read summaries better than they imitate examples. Every description is a
cached generator call, so a resumed run writes none of them again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from apm_bench.backends.base import Backend, GenerationRequest, Message, SamplingParams, chat
from apm_bench.errors import UninformativeFeedbackError
from apm_bench.methods.base import FitContext, FitUser, MethodOptions, Personalization, Personalizer, UserView, register_method
from apm_bench.methods.context_budget import ContextBudget, trimmed_note
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.trained import scored_candidates
from apm_bench.sim.style import stable_seed
from apm_bench.world.prompting import preference_messages, preferences_context, vibe_messages

if TYPE_CHECKING:
    from sklearn.neighbors import NearestNeighbors


class RagAdvancedOptions(MethodOptions):
    k: int = Field(default=3, ge=1, description="neighbours whose preference descriptions are shown")
    max_tokens: int = Field(default=160, ge=8, description="length limit of each vibe and preference description")
    temperature: float = Field(default=0.7, ge=0, description="sampling temperature of the descriptions")


def _messages(system: str, user: str) -> tuple[Message, ...]:
    return (Message("system", system), Message("user", user))


@register_method("rag-advanced")
class RagAdvanced(Personalizer):
    description = ("The authors' second RAG: the generator describes each history's 'vibe'; retrieve on the vibes; show "
                   "the k nearest users' preference descriptions, written from their best and worst responses.")
    Options = RagAdvancedOptions
    options: RagAdvancedOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._generator: Backend | None = None
        self._embedder: HistoryEmbedder | None = None
        self._budget = ContextBudget()
        self._index: NearestNeighbors | None = None  # scikit-learn loads when an index is built
        self._preferences: list[str] = []
        self._ids: list[str] = []
        self._world = 0
        #: training user id → (vibe, preference description), for inspection
        self.descriptions: dict[str, tuple[str, str]] = {}

    def fit(self, context: FitContext) -> None:
        self._generator, self._embedder, self._budget = context.generator, context.embedder, context.budget
        self._world = context.seed
        indexed = [(user, ranked) for user in context.train_users
                   if len(ranked := scored_candidates(context, user)) >= 2 and ranked[0][1] > ranked[-1][1]]
        if not indexed:
            raise UninformativeFeedbackError("rag-advanced", "no training user has candidates the feedback tells apart")
        vibe_requests = [self._vibe_request(user, "fit") for user, _ in indexed]
        preference_requests = [
            self._request(_messages(*preference_messages(user.prompt, ranked[0][0], ranked[-1][0])), "preference", user.id)
            for user, ranked in indexed
        ]
        written = [g.text for g in context.generator.generate(vibe_requests + preference_requests)]
        vibes, preferences = written[: len(indexed)], written[len(indexed) :]
        self._preferences, self._ids = preferences, [user.id for user, _ in indexed]
        self.descriptions = {user.id: (v, p) for (user, _), v, p in zip(indexed, vibes, preferences)}
        from sklearn.neighbors import NearestNeighbors
        self._index = NearestNeighbors(n_neighbors=min(self.options.k, len(indexed)), metric="cosine")
        self._index.fit(context.embedder.embed_texts(vibes))

    def _request(self, messages: tuple[Message, ...], kind: str, user_id: str) -> GenerationRequest:
        return GenerationRequest(messages, seed=stable_seed("rag-advanced", kind, self._world, user_id),
                                 params=SamplingParams(temperature=self.options.temperature, max_tokens=self.options.max_tokens))

    def _fitted_history(self, history: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
        """The newest part of the history that fits a vibe request in the generator's context."""
        trimmed = self._budget.newest(history, lambda h: _messages(*vibe_messages(list(h))), answer_tokens=self.options.max_tokens)
        return history[trimmed.dropped :], trimmed.dropped

    def _vibe_request(self, user: UserView | FitUser, stage: str) -> GenerationRequest:
        history, _ = self._fitted_history(user.history)
        return self._request(_messages(*vibe_messages(list(history))), f"vibe-{stage}", user.id)

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def retrieve(self, users: Sequence[UserView]) -> tuple[list[str], np.ndarray]:
        """Each user's vibe, and the indexed training users nearest to it (rows of indices, nearest first)."""
        if self._generator is None or self._index is None or self._embedder is None:
            raise RuntimeError("rag-advanced must be fitted before it personalizes")
        vibes = [g.text for g in self._generator.generate([self._vibe_request(u, "test") for u in users])]
        _, rows = self._index.kneighbors(self._embedder.embed_texts(vibes), n_neighbors=min(self.options.k, len(self._ids)))
        return vibes, rows

    def neighbours(self, users: Sequence[UserView]) -> list[list[str]]:
        """Ids of the training users whose preference descriptions each user is shown."""
        return [[self._ids[i] for i in row] for row in self.retrieve(users)[1]]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        if not users:
            return []
        vibes, rows = self.retrieve(users)
        return [
            Personalization(chat(prompt, system=preferences_context([self._preferences[i] for i in row])),
                            notes={"summary": vibe, **trimmed_note(self._fitted_history(user.history)[1])})
            for user, prompt, vibe, row in zip(users, prompts, vibes, rows)
        ]
