"""Soft-prompt: the frozen history embedding φ(history) goes through a 2-layer MLP to m virtual
tokens placed before the prompt; the MLP and a LoRA adapter are trained together by a preference
loss on training users' (best, worst) candidates: DPO (reference = adapter off, no soft token) or
SimPO.

Two presets: `paper`, the authors' settings (SimPO β 2 γ 1, or DPO β 0.1; a Linear → GELU →
Linear projector as wide as the model; LoRA r 16, α 32, dropout 0.05 on q/k/v/o; AdamW lr 5e-5,
one epoch, batch 1 × 8 accumulation, clipping at 1.0; responses cut at 1 024 tokens; greedy test
decoding), the default on language models; and `sim`, tuned for the simulator's small linear
policy, the default there. Any option set explicitly overrides its preset.

At test time each user's tokens and the shared adapter go into the generation request: the
policy's soft-prompt input on `sim`, `inputs_embeds` on `hf`, prompt embeddings + LoRARequest on
`vllm` (serve a run's artifacts there with the `artifacts` option).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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

if TYPE_CHECKING:  # torch loads when a projector is built or read
    from apm_bench.methods.soft_prompt_projector import SoftPromptProjector

SOFT_PROMPTS = "soft_prompts.safetensors"
ADAPTER_FOLDER = "adapter"


class SoftPromptOptions(MethodOptions):
    """Unset fields take their value from the preset: `paper` (the authors' settings, for language
    models) or `sim` (tuned for the simulator); `auto` picks by the engine that trains."""

    preset: Literal["auto", "paper", "sim"] = "auto"
    loss: Literal["dpo", "simpo"] | None = None
    tokens: int = Field(default=1, ge=1, description="m, the number of virtual tokens (the paper: 1)")
    hidden: int | None = Field(default=None, ge=1, description="width of the MLP's hidden layer (paper: the model's hidden size)")
    activation: Literal["tanh", "gelu"] | None = None
    rank: int = Field(default=16, ge=1, description="LoRA rank")
    lora_alpha: float | None = Field(default=None, gt=0, description="LoRA α (paper: 32; sim: 2·rank)")
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    lora_targets: list[str] | None = Field(default=None, description="modules LoRA adapts (paper: q/k/v/o_proj; sim: all linear)")
    pairs_per_user: int = Field(default=1, ge=1, description="k-th best vs k-th worst candidate, k = 1..this")
    beta: float | None = Field(default=None, gt=0, description="paper: 2 for SimPO, 0.1 for DPO")
    gamma: float | None = Field(default=None, ge=0, description="SimPO's target margin")
    epochs: int | None = Field(default=None, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    grad_accum: int | None = Field(default=None, ge=1, description="batches per optimiser step")
    clip: float | None = Field(default=None, gt=0, description="gradient norm limit")
    optimizer: Literal["adam", "adamw"] | None = None
    max_response_tokens: int | None = Field(default=None, ge=1, description="tokens of each training response scored (paper: 1024)")
    greedy: bool | None = Field(default=None, description="decode test responses greedily (paper: yes)")
    sft_weight: float = Field(default=0.0, ge=0)
    artifacts: Path | None = Field(default=None, description="serve trained artifacts from this folder instead of training")


class SoftPromptSettings(BaseModel):
    """Every training setting resolved: the preset's values under the options the user set."""

    model_config = ConfigDict(frozen=True)

    loss: Literal["dpo", "simpo"]
    hidden: int | None  # None: the model's hidden size
    activation: Literal["tanh", "gelu"]
    lora_alpha: float | None  # None: 2·rank
    lora_dropout: float
    lora_targets: list[str] | None  # None: every linear layer
    beta: float
    gamma: float
    epochs: int
    learning_rate: float
    batch_size: int
    grad_accum: int
    clip: float | None
    optimizer: Literal["adam", "adamw"]
    max_response_tokens: int | None
    greedy: bool


#: the authors' user-embedding settings (their `user_embedding.yaml`) and apm-bench's for the simulator,
#: whose policy is a small linear model that needs larger steps and many epochs
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(loss="simpo", hidden=None, activation="gelu", lora_alpha=32.0, lora_dropout=0.05,
                  lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], gamma=1.0, epochs=1, learning_rate=5e-5,
                  batch_size=1, grad_accum=8, clip=1.0, optimizer="adamw", max_response_tokens=1024, greedy=True),
    "sim": dict(loss="dpo", hidden=256, activation="tanh", lora_alpha=None, lora_dropout=0.0, lora_targets=None,
                gamma=0.5, epochs=40, learning_rate=0.01, batch_size=64, grad_accum=1, clip=None, optimizer="adam",
                max_response_tokens=None, greedy=False),
}
PAPER_BETA = {"simpo": 2.0, "dpo": 0.1}


def resolve_settings(options: SoftPromptOptions, simulated: bool) -> SoftPromptSettings:
    """The preset (`auto`: `sim` on the simulator, `paper` on a language model) under the set options."""
    preset = options.preset if options.preset != "auto" else ("sim" if simulated else "paper")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in options.model_dump().items() if k in SoftPromptSettings.model_fields and v is not None})
    if "beta" not in values:
        values["beta"] = PAPER_BETA[values["loss"]] if preset == "paper" else 0.5
    if simulated:  # the simulator's responses are style vectors, not token sequences
        values["max_response_tokens"] = None
    return SoftPromptSettings(**values)


def export_soft_prompts(path: Path, user_ids: Sequence[str], embeddings: np.ndarray) -> None:
    """One (m, hidden) float32 tensor per user, keyed by user id: the rows that go in front of the
    prompt's token embeddings in vLLM's `EmbedsPrompt(prompt_embeds=...)`. Replaced atomically."""
    import torch
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

    def embeds_histories(self) -> bool:
        return True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.projector: SoftPromptProjector | None = None
        self.adapter: AdapterRef | None = None
        self.folder: Path | None = None
        self.record: TrainingRecord | None = None
        self.settings: SoftPromptSettings | None = None
        self._embed: Any = None

    def training_records(self) -> list[TrainingRecord]:
        return [self.record] if self.record is not None else []

    # ------------------------------------------------------------------ fit

    def fit(self, context: FitContext) -> None:
        self._embed = context.embedder.embed_histories
        # the trainer is the generator, or transformers beside a vLLM generator: the simulator only
        # trains itself, so the generator says which preset applies without loading any trainer
        self.settings = resolve_settings(self.options, context.generator.capabilities.simulated)
        given = existing_artifacts(self.name, self.options.artifacts)
        if given is not None:
            self._load(given, "soft-prompt-" + given.name, export=False)
            return
        pairs, features = self._pairs(context)
        options = {**self.options.model_dump(mode="json", exclude={"artifacts"}), "resolved": self.settings.model_dump(mode="json")}
        key = artifact_key(self.name, context, options, [(p.request.messages[-1].content, p.chosen, p.rejected) for p in pairs]
                           + [np.round(features, 6).tolist()])
        found = context.artifacts.find(key) if context.artifacts is not None else None
        if found is not None:
            self._load(found, key)
            self.record = TrainingRecord(name=key, examples=len(pairs), reused=True)
            return
        engine = trainer(self.name, context)  # built only now: stored weights need no trainer
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
        o, t = self.options, self.settings
        assert t is not None
        lora = {} if engine.capabilities.simulated else {
            "alpha": t.lora_alpha, "dropout": t.lora_dropout, "targets": t.lora_targets or "all-linear"}
        adapter_parameters = engine.create_adapter(name, rank=o.rank, seed=context.seed, **lora)
        width = engine.soft_prompt_width
        import torch

        from apm_bench.methods.soft_prompt_projector import SoftPromptProjector

        self.projector = SoftPromptProjector(features.shape[1], t.hidden or width, o.tokens, width, seed=context.seed,
                                             activation=t.activation)
        inputs = torch.as_tensor(features, dtype=torch.float32)
        adapter = AdapterRef(name)

        def policy_requests(batch: list[int]) -> list[GenerationRequest]:
            assert self.projector is not None
            tokens = self.projector(inputs[batch])
            return [dataclasses.replace(pairs[i].request, adapter=adapter, soft_prompt=SoftPrompt(t))  # type: ignore[arg-type]
                    for i, t in zip(batch, tokens)]

        settings = PreferenceSettings(
            epochs=t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size, seed=context.seed, optimizer=t.optimizer,
            grad_accum=t.grad_accum, clip=t.clip, loss=t.loss, beta=t.beta, gamma=t.gamma, sft_weight=o.sft_weight,
            max_response_tokens=t.max_response_tokens)
        parameters = list(adapter_parameters) + list(self.projector.parameters())
        with engine.training():
            self.record = train_preference(engine, name, pairs, policy_requests, parameters, settings, context.report)
        self.adapter = adapter
        self.projector.requires_grad_(False)

    def _load(self, folder: Path, name: str, export: bool = True) -> None:
        """Serve from a finished artifact folder; test users' tokens are exported into it unless it
        belongs to another run."""
        from apm_bench.methods.soft_prompt_projector import SoftPromptProjector

        self.folder = folder if export else None
        self.projector = SoftPromptProjector.load(folder)
        self.projector.requires_grad_(False)
        self.adapter = AdapterRef(name, str(folder / ADAPTER_FOLDER))

    # ------------------------------------------------------------------ personalize

    def soft_prompts(self, users: Sequence[UserView]) -> np.ndarray:
        if self.projector is None or self._embed is None:
            raise RuntimeError("soft-prompt must be fitted before it personalizes")
        import torch

        with torch.no_grad():
            return self.projector(torch.as_tensor(self._embed([u.history for u in users]), dtype=torch.float32)).numpy()

    def personalize(self, user: UserView, prompt: str) -> Personalization:
        return self.personalize_many([user], [prompt])[0]

    def personalize_many(self, users: Sequence[UserView], prompts: Sequence[str]) -> list[Personalization]:
        tokens = self.soft_prompts(users)
        if self.folder is not None and users:
            export_soft_prompts(self.folder / SOFT_PROMPTS, [u.id for u in users], tokens)
        greedy = 0.0 if self.settings is not None and self.settings.greedy else None
        return [Personalization(chat(p), adapter=self.adapter, soft_prompt=SoftPrompt(t), temperature=greedy)
                for p, t in zip(prompts, tokens)]
