"""The plug-in point: a personalization method is a `Personalizer` subclass.

At fit time a method sees training-side users (id, history, and the prompt their candidates were
written for), the feedback oracle, the generator and φ. At test time it sees a test user's id and
history plus the prompt to answer, and returns what to send to the generator: messages, and
optionally an adapter and soft-prompt embeddings. Nothing it is handed holds targets or C.

Register a method with `@register_method("name")`, or from another package through the entry
point group `apm_bench.methods`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from apm_bench.backends.base import AdapterRef, Backend, Message, SoftPrompt
from apm_bench.errors import ConfigError, first_error
from apm_bench.judging.feedback import FeedbackOracle
from apm_bench.methods.context_budget import ContextBudget
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.registry import Registry
from apm_bench.world.catalog import Principle
from apm_bench.world.prompting import InstructionTexts
from apm_bench.world.users import Target

if TYPE_CHECKING:
    from apm_bench.methods.artifacts import ArtifactStore
    from apm_bench.methods.training import TrainingRecord


def _quiet(message: str) -> None:
    """The default progress sink of a fit: say nothing."""


@dataclass(frozen=True)
class UserView:
    """What a method may know about a user: an opaque id and their past messages."""

    id: str
    history: tuple[str, ...]


@dataclass(frozen=True)
class FitUser(UserView):
    """A training-side user, with the prompt their feedback candidates answer."""

    prompt: str


@dataclass(frozen=True)
class Personalization:
    messages: tuple[Message, ...]
    adapter: AdapterRef | None = None
    soft_prompt: SoftPrompt | None = None
    #: the method's own decoding temperature (0: greedy, as the authors decode soft-prompt
    #: responses); None: the run's
    temperature: float | None = None
    #: what the method wants recorded with the sample, e.g. {"summary": ...}; "context_trimmed":
    #: how many history messages or examples were left out to fit the generator's context
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class FitContext:
    train_users: list[FitUser]
    validation_users: list[FitUser]
    feedback: FeedbackOracle
    generator: Backend
    embedder: HistoryEmbedder
    principles: list[Principle]
    seed: int
    #: where trained weights are kept and found again (None: train in memory only)
    artifacts: ArtifactStore | None = None
    #: a line of progress (e.g. "training soft-prompt: step 40/300, loss 0.41") for the user's display
    report: Callable[[str], None] = _quiet
    #: the generator's context less the answer's tokens: what histories and examples may fill
    budget: ContextBudget = field(default_factory=ContextBudget)
    #: whose wording style instructions and the RAG prompt use (the paper's protocol: the authors')
    texts: InstructionTexts = "apm-bench"
    #: where the generator cannot train (vLLM): builds, on first call, an engine of the same model
    #: that can (transformers); what it trains is saved and served by the generator
    trainer: Callable[[], Backend] | None = None


class MethodOptions(BaseModel):
    """Options a method accepts; subclasses add fields. Unknown options are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Personalizer(ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: Evaluation-only upper bounds (the oracle) are handed test targets; nothing else ever is.
    evaluation_only: ClassVar[bool] = False
    #: an evaluation-only method that reads the judge's scores of the test users' own candidates
    #: (the paper's oracle): the run writes and rates candidates for test users too
    needs_test_feedback: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except ValidationError as exc:
            raise ConfigError(f"method {self.name!r}: option {first_error(exc)}") from None

    def embeds_histories(self) -> bool:
        """Whether fitting or personalizing embeds histories with φ (`context.embedder`): a run then
        encodes them in the background while candidates are written and rated. A wrong answer
        costs time, never correctness."""
        return False

    def fit(self, context: FitContext) -> None:
        """Learn from training users; methods without a learning step keep this no-op."""

    @abstractmethod
    def personalize(self, user: UserView, prompt: str) -> Personalization:
        """What to send to the generator for this test user's prompt."""

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        return [self.personalize(u, p) for u, p in zip(users, prompts)]

    def training_records(self) -> list[TrainingRecord]:
        """What the last fit trained (one record per adapter); methods that do not train have none."""
        return []

    def training_labels(self) -> dict[str, str]:
        """Training user id → the label ("follow casual") the fit derived from the judge's feedback;
        the run compares them with the true targets (routing diagnostics). Most methods derive none."""
        return {}

    def reveal_targets(self, targets: dict[str, list[Target]]) -> None:
        raise TypeError(f"method {self.name!r} is not evaluation-only and must never see targets")

    def reveal_feedback(self, feedback: FeedbackOracle) -> None:
        """For `needs_test_feedback` methods only: feedback on the test users' candidates."""
        raise TypeError(f"method {self.name!r} does not read test users' feedback and must never see it")


METHODS: Registry[type[Personalizer]] = Registry("method", entry_point_group="apm_bench.methods")


def register_method(name: str):  # type: ignore[no-untyped-def]
    """Class decorator: `@register_method("mine") class Mine(Personalizer): ...`."""

    def decorator(cls: type[Personalizer]) -> type[Personalizer]:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return decorator
