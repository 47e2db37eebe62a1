"""The embedded default backend: the style simulator behind the common Backend interface."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apm_bench.backends.base import Backend, Capabilities, Generation, GenerationRequest, Message
from apm_bench.cache import cache_key
from apm_bench.sim.levels import base_map, level_log_probs, sample_levels, style_log_prob
from apm_bench.sim.profile import SimProfile
from apm_bench.sim.reader import ContextReader, memoised
from apm_bench.sim.style import StyleCodec, stable_seed
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompting import PREFERENCE_INSTRUCTION, SUMMARIZE_INSTRUCTION, VIBE_INSTRUCTION

if TYPE_CHECKING:  # torch loads when something trains or simulates, not on import
    import torch

    from apm_bench.sim.policy import SimPolicy
    from apm_bench.sim.summarizer import SimSummarizer

SIM_VERSION = "6"  # bump when the simulator's behaviour changes, so old cache entries are not reused
ADAPTER_FILE = "sim_adapter.pt"
SUMMARIZER_ADAPTER_FILE = "sim_summarizer_adapter.pt"


def _adapter_path(requests: Sequence[GenerationRequest], name: str) -> Path:
    """Where a request names the saved weights of an adapter the engine has not loaded yet."""
    path = next((r.adapter.path for r in requests if r.adapter and r.adapter.name == name and r.adapter.path), None)
    if path is None:
        raise KeyError(f"adapter {name!r} is neither loaded nor given a path")
    return Path(path)


class SimBackend(Backend):
    """Generation = read the context, sample a style vector from the policy, render it as text.

    The draw depends only on the request's seed, so two methods asked with the same seed share
    their randomness (common random numbers), and their difference reflects their contexts.
    """

    name = "sim"
    capabilities = Capabilities(logprobs=True, adapters=True, soft_prompts=True, trainable=True, batch_invariant=False,
                                simulated=True)

    def __init__(self, model: str, profile: SimProfile, catalog: Catalog, seed: int = 0) -> None:
        self.model = model
        self.catalog = catalog
        self.profile = profile
        self.seed = seed
        self.codec = StyleCodec(catalog.principles)
        self.reader = ContextReader(catalog.principles, catalog.attributes, self.codec)
        self._read: dict[tuple[Message, ...], np.ndarray] = {}
        self._levels_memo: dict[str, np.ndarray] = {}

    @cached_property
    def policy(self) -> SimPolicy:
        """Built on first use: a rerun whose every answer is cached never loads torch."""
        from apm_bench.sim.policy import SimPolicy

        return SimPolicy(self.profile, self.catalog.principles, self.catalog.attributes, self.reader.width, seed=self.seed)

    @cached_property
    def summarizer(self) -> SimSummarizer:
        from apm_bench.sim.summarizer import SimSummarizer

        return SimSummarizer(self.catalog.principles, self.catalog.attributes)

    def fingerprint(self) -> str:
        """The simulator's answers depend on its profile, the catalog pool and its own version."""
        return cache_key(SIM_VERSION, self.name, self.model, self.profile.model_dump(), self.catalog.model_dump())

    def feature_rows(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        """What the policy reads from each context, memoised: training scores the same requests
        every epoch, and reading is the slow part of the simulator."""
        rows = [memoised(self._read, tuple(conversation), self.reader.read) for conversation in conversations]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.reader.width), dtype=np.float32)

    def features(self, conversations: Sequence[Sequence[Message]]) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.feature_rows(conversations))

    @cached_property
    def base_map(self) -> np.ndarray:
        return base_map(self.profile, self.catalog.principles, self.catalog.attributes, self.reader.width)

    def _levels(self, response: str) -> np.ndarray:
        """A response's style vector, memoised: training scores the same responses every epoch."""
        return memoised(self._levels_memo, response, self.codec.levels)

    def _user_evidence(self, request: GenerationRequest) -> np.ndarray:
        """The attribute phrases in what the user wrote (the reader memoises each message)."""
        return self.reader.messages_evidence([m.content for m in request.messages if m.role == "user"])

    def push_for(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        import torch

        features = self.features([r.messages for r in requests])
        adapters = [r.adapter.name if r.adapter else None for r in requests]
        for name in {a for a in adapters if a is not None} - set(self.policy.adapters):
            path = _adapter_path(requests, name)
            self.policy.load_adapter(name, str(path / ADAPTER_FILE if path.is_dir() else path))
        soft = [
            torch.as_tensor(r.soft_prompt.embeddings, dtype=torch.float32) if r.soft_prompt is not None else None
            for r in requests
        ]
        has_adapter = any(a is not None for a in adapters)
        has_soft = any(s is not None for s in soft)
        return self.policy.push(features, adapters if has_adapter else None, soft if has_soft else None)

    # ------------------------------------------------------------------ summaries (POPI)

    @staticmethod
    def is_summary_request(request: GenerationRequest) -> bool:
        """A request for POPI's preference summary of a user's messages."""
        return any(m.role == "system" and m.content.startswith(SUMMARIZE_INSTRUCTION) for m in request.messages)

    @staticmethod
    def is_vibe_request(request: GenerationRequest) -> bool:
        """A request to describe how a user writes (rag-advanced's retrieval key)."""
        return any(m.role == "system" and m.content.startswith(VIBE_INSTRUCTION) for m in request.messages)

    @staticmethod
    def is_preference_request(request: GenerationRequest) -> bool:
        """A request to say what a (prompt, best, worst) triple shows about a user (rag-advanced)."""
        return any(m.role == "system" and m.content.startswith(PREFERENCE_INSTRUCTION) for m in request.messages)

    def _kind(self, request: GenerationRequest) -> str:
        if self.is_summary_request(request):
            return "summary"
        if self.is_vibe_request(request):
            return "vibe"
        return "preference" if self.is_preference_request(request) else "response"

    def _vibes(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Catalog descriptions of the attribute sides the messages show: what an LLM would say
        about how this user writes, and nothing about the answers they want."""
        generations = []
        for request in requests:
            rng = np.random.default_rng(stable_seed("sim-vibe", request.seed))
            text = self.summarizer.describe_writing(self._user_evidence(request), request.params.temperature, rng)
            generations.append(Generation(text, 0.0 if request.params.logprobs else None,
                                          sum(len(m.content.split()) for m in request.messages), len(text.split())))
        return generations

    def _preferences(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The principles whose markers differ most between the best and the worst answer, as
        preference statements; an imperfect reader like the rest of the simulator (it sees markers only)."""
        generations = []
        for request in requests:
            shown = "\n".join(m.content for m in request.messages if m.role == "user")
            text = self.summarizer.describe_preference(self.reader.imitation(shown))
            generations.append(Generation(text, 0.0 if request.params.logprobs else None,
                                          sum(len(m.content.split()) for m in request.messages), len(text.split())))
        return generations

    def _summary_log_probs(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        import torch

        evidence = np.sign(np.stack([self._user_evidence(r) for r in requests]))
        adapters = [r.adapter.name if r.adapter else None for r in requests]
        for name in {a for a in adapters if a is not None} - set(self.summarizer.adapters):
            weight = torch.load(_adapter_path(requests, name) / SUMMARIZER_ADAPTER_FILE, map_location="cpu", weights_only=True)
            self.summarizer.add_adapter(name).data.copy_(weight)
        return self.summarizer.log_probs(self.summarizer.features(evidence), adapters)

    def _summaries(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        import torch

        with torch.no_grad():
            log_probs = self._summary_log_probs(requests)
        generations = []
        for request, row in zip(requests, log_probs):
            rng = np.random.default_rng(stable_seed("sim-summary", request.seed))
            text = self.summarizer.sample(row, request.params.temperature, rng)
            logprob = float(self.summarizer.summary_log_prob(row, text)) if request.params.logprobs else None
            generations.append(Generation(text, logprob, sum(len(m.content.split()) for m in request.messages), len(text.split())))
        return generations

    # ------------------------------------------------------------------ training interface

    def add_adapter(self, name: str, kind: str = "style", rank: int = 4, seed: int = 0) -> list[torch.nn.Parameter]:
        """A new zero-initialised adapter of the style policy or of the summarizer; returns its parameters."""
        if kind == "summarizer":
            return [self.summarizer.add_adapter(name)]
        return list(self.policy.add_adapter(name, rank=rank, seed=seed).parameters())

    def create_adapter(self, name: str, rank: int = 4, seed: int = 0, **lora: Any) -> list[torch.nn.Parameter]:
        """A new trainable style adapter (the trainer interface shared with the hf backend); LoRA's
        α, dropout and target modules have no meaning for the simulator's adapters and are ignored."""
        return self.add_adapter(name, kind="style", rank=rank, seed=seed)

    def training(self) -> AbstractContextManager[None]:
        """The simulator has no dropout: training and evaluation modes are the same."""
        return nullcontext()

    def save_adapter(self, name: str, directory: Path) -> Path:
        """Write a style or summarizer adapter into `directory`; an AdapterRef with this path loads it again."""
        import torch

        directory.mkdir(parents=True, exist_ok=True)
        if name in self.summarizer.adapters:
            torch.save(self.summarizer.adapters[name].detach().clone(), directory / SUMMARIZER_ADAPTER_FILE)
        else:
            self.policy.save_adapter(name, str(directory / ADAPTER_FILE))
        return directory

    @property
    def soft_prompt_width(self) -> int:
        return self.policy.profile.hidden_size

    def response_length(self, responses: Sequence[str]) -> list[int]:
        """A response is one style decision per principle: its 'length' for length normalisation."""
        return [self.codec.size] * len(responses)

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        if name in self.summarizer.adapters:
            return [self.summarizer.adapters[name]]
        return list(self.policy.adapters[name].parameters())

    def sequence_logprob(self, requests: Sequence[GenerationRequest], responses: Sequence[str]) -> torch.Tensor:
        """log π(response | request) with gradients: a summary's statements, or a response's style vector."""
        import torch

        summary_rows = [i for i, r in enumerate(requests) if self.is_summary_request(r)]
        other_rows = sorted(set(range(len(requests))) - set(summary_rows))
        values: dict[int, torch.Tensor] = {}
        if summary_rows:
            log_probs = self._summary_log_probs([requests[i] for i in summary_rows])
            for i, row in zip(summary_rows, log_probs):
                values[i] = self.summarizer.summary_log_prob(row, responses[i])
        if other_rows:
            subset = [requests[i] for i in other_rows]
            styles = torch.as_tensor(np.stack([self._levels(responses[i]) for i in other_rows]))
            temperatures = torch.tensor([r.params.temperature for r in subset], dtype=torch.float32)
            for i, value in zip(other_rows, self.policy.style_log_prob(self.push_for(subset), styles, temperatures)):
                values[i] = value
        rows = [values[i] for i in range(len(requests))]
        return torch.stack(rows) if rows else torch.zeros(0)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Each kind of request (descriptions of users, of rated pairs, answers) goes to its part."""
        handlers = {"summary": self._summaries, "vibe": self._vibes, "preference": self._preferences, "response": self._respond}
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._kind(request), []).append(index)
        results: dict[int, Generation] = {}
        for kind, rows in groups.items():
            results.update(zip(rows, handlers[kind]([requests[i] for i in rows])))
        return [results[i] for i in range(len(requests))]

    def _respond(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Requests with adapters or soft prompts need the torch policy; the rest are answered in numpy."""
        if not requests:
            return []
        if any(r.adapter is not None or r.soft_prompt is not None for r in requests):
            import torch

            with torch.no_grad():
                push = self.push_for(requests).numpy()
        else:
            push = self.feature_rows([r.messages for r in requests]) @ self.base_map.T
        rngs = [np.random.default_rng(stable_seed("sim-generate", r.seed)) for r in requests]
        uniforms = np.stack([rng.random(self.codec.size) for rng in rngs])
        temperatures = np.array([r.params.temperature for r in requests])
        log_probs = level_log_probs(push, self.profile.stickiness, temperatures)
        styles = sample_levels(log_probs, uniforms)
        values = style_log_prob(log_probs, styles).tolist()
        logprobs = [float(v) if r.params.logprobs else None for r, v in zip(requests, values)]
        generations = []
        for request, style, rng, logprob in zip(requests, styles, rngs, logprobs):
            prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
            text = self.codec.render(prompt, style, rng)
            generations.append(
                Generation(
                    text=text,
                    logprob=logprob,
                    prompt_tokens=sum(len(m.content.split()) for m in request.messages),
                    completion_tokens=len(text.split()),
                )
            )
        return generations
