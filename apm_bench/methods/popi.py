"""POPI: infer a short natural-language preference summary from the history; the generator sees
the summary only.

- `popi-untrained`: the base model summarises the history with a fixed prompt.
- `popi` (optimised): on training users, sample n summaries each, score each by the reward of
  the response written under it (feedback oracle), and keep the best and worst. On a backend
  that trains (sim, hf) the summarizer is then trained by DPO on those pairs with an adapter;
  elsewhere (vLLM, OpenAI-compatible servers) it is best-of-n selection: a test user's n sampled
  summaries are ranked by their similarity to the best summaries of the most similar training
  users.
- `summaries_file` reuses summaries written in another run (e.g. by another generator).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from apm_bench.backends.base import AdapterRef, Backend, GenerationRequest, Message, SamplingParams, chat
from apm_bench.cache import cache_key
from apm_bench.errors import ConfigError, PromptFileError, UninformativeFeedbackError
from apm_bench.methods.base import (
    FitContext,
    FitUser,
    MethodOptions,
    Personalization,
    Personalizer,
    UserView,
    register_method,
)
from apm_bench.methods.context_budget import ContextBudget, trimmed_note
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.training import PreferencePair, TrainingRecord, can_train, train_dpo
from apm_bench.sim.style import stable_seed
from apm_bench.world.prompting import summarize_messages, summary_context

if TYPE_CHECKING:
    from sklearn.neighbors import NearestNeighbors


class PopiOptions(MethodOptions):
    mode: Literal["untrained", "optimised"] = "optimised"
    optimiser: Literal["auto", "dpo", "best_of_n"] = Field(default="auto", description="auto: dpo where the backend trains")
    n_samples: int = Field(default=16, ge=2, description="summaries sampled per user")
    beta: float = Field(default=0.5, gt=0)
    epochs: int = Field(default=30, ge=1)
    learning_rate: float = Field(default=0.05, gt=0)
    sft_weight: float = Field(default=1.0, ge=0, description="weight of the chosen summaries' likelihood term")
    neighbours: int = Field(default=5, ge=1, description="best-of-n: training users whose best summaries guide the choice")
    max_tokens: int = Field(default=128, ge=8)
    sample_temperature: float = Field(default=2.0, gt=0, description="exploration when sampling training summaries")
    responses_per_summary: int = Field(default=4, ge=1, description="responses averaged to score one summary")
    temperature: float = Field(default=0.7, gt=0, description="sampling temperature of test users' summaries")
    summaries_file: Path | None = Field(default=None, description="reuse summaries (samples.parquet of a run, or JSONL)")
    summaries_method: str = Field(default="popi", description="which method's summaries to take from a samples file")


def summary_messages(history: Sequence[str]) -> tuple[Message, ...]:
    system, user = summarize_messages(list(history))
    return (Message("system", system), Message("user", user))


def summary_request(
    history: Sequence[str], seed: int, max_tokens: int, temperature: float, adapter: AdapterRef | None = None
) -> GenerationRequest:
    return GenerationRequest(
        messages=summary_messages(history),
        seed=seed,
        params=SamplingParams(temperature=temperature, max_tokens=max_tokens),
        adapter=adapter,
    )


def load_summaries(path: Path, method: str = "popi") -> dict[tuple[int | None, str], str]:
    """(world or None, user id) → summary, from a run's samples.parquet (rows of `method`) or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"summaries file not found: {path}")
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if "summary" not in frame.columns:
            raise PromptFileError(f"{path} has no 'summary' column (is it a run with popi?)")
        frame = frame.dropna(subset=["summary"])
        if "method" in frame.columns:
            frame = frame[frame["method"] == method]
        if frame.empty:
            raise PromptFileError(f"{path} has no summaries written by method {method!r}")
        return {(int(r.world), str(r.user_id)): str(r.summary) for r in frame.itertuples()}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return {(row.get("world"), str(row["user_id"])): str(row["summary"]) for row in rows}
    except (KeyError, TypeError, AttributeError):
        raise PromptFileError(f"{path}: every line needs 'user_id' and 'summary'") from None


def _add_summarizer_adapter(backend: Backend, name: str) -> None:
    engine: Any = getattr(backend, "inner", backend)
    if hasattr(engine, "summarizer"):  # the simulator keeps its summarizer apart from its style policy
        engine.add_adapter(name, kind="summarizer")
        return
    from peft import LoraConfig

    engine.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))


@register_method("popi")
class Popi(Personalizer):
    description = "POPI: an optimised summarizer infers a preference summary; the generator sees the summary only."
    Options = PopiOptions
    options: PopiOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._generator: Backend | None = None
        self._embedder: HistoryEmbedder | None = None
        self._world = 0
        self.adapter: AdapterRef | None = None
        self.training: TrainingRecord | None = None
        self._best: list[tuple[tuple[str, ...], str]] = []
        self._index: NearestNeighbors | None = None  # scikit-learn loads when an index is built
        self._reused: dict[tuple[int | None, str], str] | None = None
        self._budget = ContextBudget()
        #: test user id → history messages left out of their summary request to fit the context
        self.trimmed: dict[str, int] = {}

    def training_records(self) -> list[TrainingRecord]:
        return [self.training] if self.training is not None else []

    # ------------------------------------------------------------------ fit

    def fit(self, context: FitContext) -> None:
        self._generator, self._embedder, self._world = context.generator, context.embedder, context.seed
        self._budget = context.budget
        if self.options.summaries_file is not None:
            self._reused = load_summaries(self.options.summaries_file, self.options.summaries_method)
            return
        if self.options.mode == "untrained":
            return
        pairs = self._best_and_worst(context)
        if not pairs:
            raise UninformativeFeedbackError("popi", "no training user's sampled summaries could be told apart")
        if self._optimiser() == "dpo":
            name = "popi-" + cache_key(context.seed, context.generator.fingerprint(),
                                       [(p.request.messages[-1].content, p.chosen, p.rejected) for p in pairs],
                                       self.options.model_dump(mode="json"))[:16]
            self._train_summarizer(name, pairs, context)
        else:
            histories = [h for h, _ in self._best]
            from sklearn.neighbors import NearestNeighbors
            self._index = NearestNeighbors(n_neighbors=min(self.options.neighbours, len(histories)), metric="cosine")
            self._index.fit(context.embedder.embed_histories(histories))

    def _train_summarizer(self, name: str, pairs: list[PreferencePair], context: FitContext) -> None:
        """DPO of a summarizer adapter, or the stored one when these pairs were trained on before."""
        found = context.artifacts.find(name) if context.artifacts is not None else None
        if found is not None:
            self.adapter = AdapterRef(name, str(found / "adapter"))
            self.training = TrainingRecord(name=name, examples=len(pairs), reused=True)
            return
        _add_summarizer_adapter(context.generator, name)
        self.training = train_dpo(context.generator, name, pairs, self.options.beta, self.options.epochs,
                                  self.options.learning_rate, seed=context.seed, sft_weight=self.options.sft_weight,
                                  report=context.report)
        self.adapter = AdapterRef(name)
        if context.artifacts is not None:
            with context.artifacts.writing(name) as staging:
                context.generator.save_adapter(name, staging / "adapter")  # type: ignore[attr-defined]
            self.adapter = AdapterRef(name, str(context.artifacts.root / name / "adapter"))

    def _optimiser(self) -> str:
        assert self._generator is not None
        if self.options.optimiser == "auto":
            return "dpo" if can_train(self._generator) else "best_of_n"
        if self.options.optimiser == "dpo" and not can_train(self._generator):
            raise ConfigError(f"popi: backend {self._generator.name!r} cannot train; use optimiser 'best_of_n'")
        return self.options.optimiser

    def _best_and_worst(self, context: FitContext) -> list[PreferencePair]:
        n = self.options.n_samples
        users: list[FitUser] = list(context.train_users)
        requests = [
            summary_request(self._history(u), stable_seed("popi-sample", context.seed, u.id, j), self.options.max_tokens,
                            self.options.sample_temperature)
            for u in users for j in range(n)
        ]
        summaries = [g.text for g in context.generator.generate(requests)]
        # Each summary is scored by the mean reward of r responses. The j-th response of every summary
        # of a user shares one seed (common random numbers): summaries compete on the same draws, so
        # the best one differs from the rest by what it says rather than by luck.
        r = self.options.responses_per_summary
        answers = context.generator.generate([
            GenerationRequest(chat(users[i // n].prompt, system=summary_context(summary)),
                              seed=stable_seed("popi-response", context.seed, users[i // n].id, k))
            for i, summary in enumerate(summaries) for k in range(r)
        ])
        scored = context.feedback.score_responses(
            [users[i // (n * r)].id for i in range(len(answers))], [users[i // (n * r)].prompt for i in range(len(answers))],
            [a.text for a in answers], seed=context.seed,
        )
        rewards = [_mean([scored[i * r + k] for k in range(r)]) for i in range(len(summaries))]
        pairs = []
        for u_index, user in enumerate(users):
            scored = [(rewards[u_index * n + j], summaries[u_index * n + j]) for j in range(n)]
            scored = [(r, s) for r, s in scored if r is not None]
            if len(scored) < 2:
                continue
            best, worst = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])
            if best[0] > worst[0] and best[1] != worst[1]:
                pairs.append(PreferencePair(requests[u_index * n], best[1], worst[1]))
                self._best.append((user.history, best[1]))
        return pairs

    def _history(self, user: UserView) -> tuple[str, ...]:
        """The newest part of the history that fits a summary request in the generator's context."""
        trimmed = self._budget.newest(user.history, summary_messages, answer_tokens=self.options.max_tokens)
        self.trimmed[user.id] = trimmed.dropped
        return user.history[trimmed.dropped:]

    # ------------------------------------------------------------------ personalize

    def summaries_for(self, users: Sequence[UserView]) -> list[str]:
        if self._generator is None:
            raise RuntimeError("popi must be fitted before it personalizes")
        if self._reused is not None:
            return [self._reused_summary(u.id) for u in users]
        if self._index is not None:
            return self._best_of_n(users)
        requests = [summary_request(self._history(u), stable_seed("popi-test", self._world, u.id), self.options.max_tokens,
                                    self.options.temperature, self.adapter) for u in users]
        return [g.text for g in self._generator.generate(requests)]

    def _reused_summary(self, user_id: str) -> str:
        assert self._reused is not None
        for key in ((self._world, user_id), (None, user_id)):
            if key in self._reused:
                return self._reused[key]
        raise PromptFileError(f"the summaries file has no summary for user {user_id!r} (world {self._world})")

    def _best_of_n(self, users: Sequence[UserView]) -> list[str]:
        assert self._generator is not None and self._embedder is not None and self._index is not None
        n = self.options.n_samples
        requests = [summary_request(self._history(u), stable_seed("popi-test", self._world, u.id, j), self.options.max_tokens,
                                    self.options.sample_temperature) for u in users for j in range(n)]
        samples = [g.text for g in self._generator.generate(requests)]
        _, neighbours = self._index.kneighbors(self._embedder.embed_histories([u.history for u in users]))
        chosen = []
        for row, near in enumerate(neighbours):
            guide = self._embedder.embed_texts([self._best[i][1] for i in near]).mean(axis=0)
            options = samples[row * n : (row + 1) * n]
            similarity = self._embedder.embed_texts(options) @ guide
            chosen.append(options[int(np.argmax(similarity))])
        return chosen

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        return [
            Personalization(chat(prompt, system=summary_context(summary)),
                            notes={"summary": summary, **trimmed_note(self.trimmed.get(user.id, 0))})
            for user, prompt, summary in zip(users, prompts, self.summaries_for(users))
        ]


@register_method("popi-untrained")
class PopiUntrained(Popi):
    description = "POPI without optimisation: the base model's own summary of the history."

    def __init__(self, **options: object) -> None:
        super().__init__(**{"mode": "untrained", **options})


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
