"""The one interface every engine implements: batched chat generation with seeds.

Requests are plain frozen dataclasses (they are built by the thousand inside a run); pydantic is
kept for the edges. A request can carry a LoRA adapter and soft-prompt embeddings so that methods
which personalize through weights use the same path as methods that personalize through text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from apm_bench.backends.budget import EngineBudget

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    logprobs: bool = False
    #: alternatives per generated position (0 = none); a judge reads its score distribution from them
    top_logprobs: int = 0
    #: for reasoning models (gpt-oss): "low" | "medium" | "high"
    reasoning_effort: str | None = None
    #: structured output: the answer must be one of these strings (engines with `structured_outputs`)
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AdapterRef:
    """A trained adapter by name; `path` points at its saved weights where the engine loads from disk."""

    name: str
    path: str | None = None


@dataclass(frozen=True, eq=False)
class SoftPrompt:
    """m virtual tokens of the model's hidden size, placed before the prompt."""

    embeddings: np.ndarray  # shape (m, hidden)


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[Message, ...]
    seed: int
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None
    soft_prompt: SoftPrompt | None = None
    #: the assistant's answer starts with this text; the engine generates its continuation
    prefill: str | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    logprob: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: per generated position, the most likely tokens and their log-probabilities
    top_logprobs: tuple[dict[str, float], ...] | None = None
    #: why nothing was generated (the prompt does not fit the model's context): such a generation
    #: is counted as failed and never judged, instead of aborting the run
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class Capabilities:
    logprobs: bool = False
    adapters: bool = False
    soft_prompts: bool = False
    trainable: bool = False
    #: decodes under a constraint (`SamplingParams.choices`), so an answer cannot fall outside it
    structured_outputs: bool = False
    #: a request's answer does not depend on which other requests share its batch; where it may
    #: (float rounding of batched matrix products), the runner keeps each (world, method) a batch
    batch_invariant: bool = True
    #: the style simulator, not a language model: methods whose settings differ between the two
    #: (soft-prompt's training presets) pick the simulator's
    simulated: bool = False


class Backend(ABC):
    """An engine bound to one model. Instances are created per run, never kept globally."""

    name: str
    model: str
    capabilities: Capabilities

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One generation per request, in order; the same request (seed included) gives the same text."""

    def fingerprint(self) -> str:
        """What, besides the request, determines an answer: part of every cache key."""
        return f"{self.name}:{self.model}"

    def context_window(self) -> int | None:
        """Tokens the model attends to (prompt plus answer); None where unknown or unlimited."""
        return None

    def prompt_tokens(self, request: GenerationRequest) -> int:
        """The request's prompt length in the model's tokens (template, prefill and soft prompt
        included); only asked where `context_window` is known."""
        raise NotImplementedError(f"backend {self.name!r} does not count tokens")

    def bind_budget(self, budget: EngineBudget) -> None:
        """Engines that hold device memory load lazily under the run's budget; others ignore it."""

    def release(self) -> None:
        """Free device memory but stay usable (the engine loads again when next used); default: nothing held."""

    def close(self) -> None:
        """Release engine resources; the default holds none."""


def context_failure(prompt_tokens: int, window: int) -> Generation:
    return Generation(text="", prompt_tokens=prompt_tokens,
                      error=f"context: a prompt of {prompt_tokens} tokens leaves no room to answer in the "
                            f"model's {window}-token context")


def within_context(
    requests: Sequence[GenerationRequest], prompt_tokens: Sequence[int], window: int | None
) -> list[GenerationRequest | Generation]:
    """Each request with its answer budget cut to what the context leaves, or, where the prompt
    alone fills the context, the failed generation that stands in for it (it is never sent)."""
    if window is None:
        return list(requests)
    fitted: list[GenerationRequest | Generation] = []
    for request, used in zip(requests, prompt_tokens, strict=True):
        room = window - used
        if room < 1:
            fitted.append(context_failure(used, window))
        elif request.params.max_tokens > room:
            fitted.append(replace(request, params=replace(request.params, max_tokens=room)))
        else:
            fitted.append(request)
    return fitted


def chat(prompt: str, system: str | None = None) -> tuple[Message, ...]:
    """The two-message conversation most methods send."""
    if system is None:
        return (Message("user", prompt),)
    return (Message("system", system), Message("user", prompt))


def identified_model(model: str) -> str:
    """The model name for cache keys, with what identifies a local folder's weights: the same path
    can hold other weights tomorrow (a rebuilt apm-tiny, a retrained checkpoint), and a cache keyed
    on the path alone would answer with the old model's outputs. A folder with a `manifest.json` checksum (as
    apm-tiny's) gives it; any other folder the names, sizes and modification times of its files
    (hashing many GB on every run would cost more than a cache miss after a copy). A hub id names
    its own weights and is returned as it is."""
    import hashlib
    import json
    from pathlib import Path

    folder = Path(model)
    if not folder.is_dir():
        return model
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            return f"{model}@{json.loads(manifest.read_text(encoding='utf-8'))['checksum']}"
        except (ValueError, KeyError, TypeError):
            pass
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return f"{model}@{digest.hexdigest()[:16]}"
