"""Soft-prompt DPO: the frozen history embedding φ(history) goes through a 2-layer MLP to m virtual
tokens placed before the prompt; the MLP and a LoRA adapter are trained together by a preference
loss on training users' (best, worst) candidates. DPO by default (reference = adapter off, no soft
token), SimPO as an option.

At test time each user's tokens and the shared adapter go into the generation request: the
policy's soft-prompt input on `sim`, `inputs_embeds` on `hf`, prompt embeddings + LoRARequest on
`vllm` (serve a run's artifacts there with the `artifacts` option).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from apm_bench.backends.base import AdapterRef, GenerationRequest, SoftPrompt, chat
from apm_bench.errors import UninformativeFeedbackError
from apm_bench.methods.base import FitContext, MethodOptions, Personalization, Personalizer, UserView, register_method
from apm_bench.methods.trained import (
    artifact_key,
    existing_artifacts,
    history_features,
    scored_candidates,
    trainer,
    training_request,
)
from apm_bench.methods.training import PreferencePair, PreferenceSettings, TrainingRecord, train_preference

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"
SOFT_PROMPTS = "soft_prompts.safetensors"
ADAPTER_FOLDER = "adapter"


class SoftPromptOptions(MethodOptions):
    loss: Literal["dpo", "simpo"] = "dpo"
    tokens: int = Field(default=1, ge=1, description="m, the number of virtual tokens (the paper: 1)")
    hidden: int = Field(default=256, ge=1, description="width of the MLP's hidden layer")
    rank: int = Field(default=16, ge=1, description="LoRA rank")
    pairs_per_user: int = Field(default=1, ge=1, description="k-th best vs k-th worst candidate, k = 1..this")
    beta: float = Field(default=0.5, gt=0)
    gamma: float = Field(default=0.5, ge=0, description="SimPO's target margin")
    epochs: int = Field(default=40, ge=1)
    learning_rate: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=64, ge=1)
    sft_weight: float = Field(default=0.0, ge=0)
    artifacts: Path | None = Field(default=None, description="serve trained artifacts from this folder instead of training")


class SoftPromptProjector(nn.Module):
    """φ(history) → m tokens of the model's hidden size; the output layer starts at zero, so an
    untrained projector adds nothing but a zero token."""

    def __init__(self, input_dim: int, hidden: int, tokens: int, width: int, seed: int = 0) -> None:
        super().__init__()
        self.shape = {"input_dim": input_dim, "hidden": hidden, "tokens": tokens, "width": width}
        generator = torch.Generator().manual_seed(seed)
        self.inner = nn.Linear(input_dim, hidden)
        self.outer = nn.Linear(hidden, tokens * width)
        with torch.no_grad():
            self.inner.weight.copy_(torch.randn(hidden, input_dim, generator=generator) / input_dim**0.5)
            self.inner.bias.zero_()
            self.outer.weight.zero_()
            self.outer.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.outer(torch.tanh(self.inner(features)))
        return out.view(len(features), self.shape["tokens"], self.shape["width"])

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / PROJECTOR_WEIGHTS))
        (directory / PROJECTOR_CONFIG).write_text(json.dumps(self.shape, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> SoftPromptProjector:
        from safetensors.torch import load_file

        projector = cls(**json.loads((directory / PROJECTOR_CONFIG).read_text(encoding="utf-8")))
        projector.load_state_dict(load_file(str(directory / PROJECTOR_WEIGHTS)))
        return projector


def export_soft_prompts(path: Path, user_ids: Sequence[str], embeddings: np.ndarray) -> None:
    """One (m, hidden) float32 tensor per user, keyed by user id: the rows that go in front of the
    prompt's token embeddings in vLLM's `EmbedsPrompt(prompt_embeds=...)`. Replaced atomically."""
    from safetensors.torch import save_file

    staging = path.with_suffix(".tmp")
    save_file({uid: torch.as_tensor(np.ascontiguousarray(e), dtype=torch.float32) for uid, e in zip(user_ids, embeddings)},
              str(staging))
    staging.replace(path)


def load_soft_prompts(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {uid: tensor.numpy() for uid, tensor in load_file(str(path)).items()}


@register_method("soft-prompt")
class SoftPromptMethod(Personalizer):
    description = "φ(history) → MLP → soft tokens before the prompt, trained with a LoRA adapter by DPO (or SimPO)."
    Options = SoftPromptOptions
    options: SoftPromptOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.projector: SoftPromptProjector | None = None
        self.adapter: AdapterRef | None = None
        self.folder: Path | None = None
        self.record: TrainingRecord | None = None
        self._embed: Any = None

    def training_records(self) -> list[TrainingRecord]:
        return [self.record] if self.record is not None else []

    # ------------------------------------------------------------------ fit

    def fit(self, context: FitContext) -> None:
        self._embed = context.embedder.embed_histories
        given = existing_artifacts(self.name, self.options.artifacts)
        if given is not None:
            self._load(given, "soft-prompt-" + given.name, export=False)
            return
        pairs, features = self._pairs(context)
        options = self.options.model_dump(mode="json", exclude={"artifacts"})
        key = artifact_key(self.name, context, options, [(p.request.messages[-1].content, p.chosen, p.rejected) for p in pairs]
                           + [np.round(features, 6).tolist()])
        found = context.artifacts.find(key) if context.artifacts is not None else None
        if found is not None:
            self._load(found, key)
            self.record = TrainingRecord(name=key, examples=len(pairs), reused=True)
            return
        engine = trainer(self.name, context)
        self._train(engine, key, pairs, features, context)
        if context.artifacts is not None:
            with context.artifacts.writing(key) as staging:
                engine.save_adapter(key, staging / ADAPTER_FOLDER)
                assert self.projector is not None
                self.projector.save(staging)
            self._load(context.artifacts.root / key, key)

    def _pairs(self, context: FitContext) -> tuple[list[PreferencePair], np.ndarray]:
        """(k-th best, k-th worst) candidate pairs of each training user, and each pair's φ(history)."""
        users = list(context.train_users)
        embedded = history_features(context, users)
        pairs, rows = [], []
        for index, user in enumerate(users):
            ranked = scored_candidates(context, user)
            for k in range(min(self.options.pairs_per_user, len(ranked) // 2)):
                (better, high), (worse, low) = ranked[k], ranked[-1 - k]
                if high > low and better != worse:  # a tie teaches nothing: the order would be arbitrary
                    pairs.append(PreferencePair(training_request(user.prompt), better, worse))
                    rows.append(index)
        if not pairs:
            raise UninformativeFeedbackError("soft-prompt", "no training user has two candidates the feedback tells apart")
        return pairs, embedded[rows]

    def _train(self, engine: Any, name: str, pairs: list[PreferencePair], features: np.ndarray, context: FitContext) -> None:
        o = self.options
        adapter_parameters = engine.create_adapter(name, rank=o.rank, seed=context.seed)
        self.projector = SoftPromptProjector(features.shape[1], o.hidden, o.tokens, engine.soft_prompt_width, seed=context.seed)
        inputs = torch.as_tensor(features, dtype=torch.float32)
        adapter = AdapterRef(name)

        def policy_requests(batch: list[int]) -> list[GenerationRequest]:
            assert self.projector is not None
            tokens = self.projector(inputs[batch])
            return [dataclasses.replace(pairs[i].request, adapter=adapter, soft_prompt=SoftPrompt(t))  # type: ignore[arg-type]
                    for i, t in zip(batch, tokens)]

        settings = PreferenceSettings(epochs=o.epochs, learning_rate=o.learning_rate, batch_size=o.batch_size, seed=context.seed,
                                      loss=o.loss, beta=o.beta, gamma=o.gamma, sft_weight=o.sft_weight)
        parameters = list(adapter_parameters) + list(self.projector.parameters())
        self.record = train_preference(engine, name, pairs, policy_requests, parameters, settings, context.report)
        self.adapter = adapter
        self.projector.requires_grad_(False)

    def _load(self, folder: Path, name: str, export: bool = True) -> None:
        """Serve from a finished artifact folder; test users' tokens are exported into it unless it
        belongs to another run."""
        self.folder = folder if export else None
        self.projector = SoftPromptProjector.load(folder)
        self.projector.requires_grad_(False)
        self.adapter = AdapterRef(name, str(folder / ADAPTER_FOLDER))

    # ------------------------------------------------------------------ personalize

    def soft_prompts(self, users: Sequence[UserView]) -> np.ndarray:
        if self.projector is None or self._embed is None:
            raise RuntimeError("soft-prompt must be fitted before it personalizes")
        with torch.no_grad():
            return self.projector(torch.as_tensor(self._embed([u.history for u in users]), dtype=torch.float32)).numpy()

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        tokens = self.soft_prompts(users)
        if self.folder is not None and users:
            export_soft_prompts(self.folder / SOFT_PROMPTS, [u.id for u in users], tokens)
        return [Personalization(chat(p), adapter=self.adapter, soft_prompt=SoftPrompt(t)) for p, t in zip(prompts, tokens)]
