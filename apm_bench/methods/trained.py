"""What the methods that learn weights (soft-prompt, cbpo) share: the engine that trains, the key
their artifacts are stored under, and the rated responses of training users."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apm_bench.backends.base import Backend, GenerationRequest, SamplingParams, chat
from apm_bench.cache import cache_key
from apm_bench.errors import ConfigError
from apm_bench.methods.base import FitContext, FitUser
from apm_bench.methods.training import can_train


def trainer(method: str, context: FitContext) -> Any:
    """The engine that trains weights for the generator's model: the generator itself where it can
    (sim, hf), else the run's trainer (transformers beside a vLLM generator); the error says how to
    get weights for other engines."""
    if can_train(context.generator):
        return context.generator
    if context.trainer is not None:
        return context.trainer()
    backend = context.generator
    raise ConfigError(
        f"{method}: backend {backend.name!r} cannot train; train with --backend hf (or sim), then serve the "
        f"run's artifacts on {backend.name!r} with method_options: {{{method}: {{artifacts: PATH}}}} in a --config file"
    )


def artifact_key(method: str, context: FitContext, options: dict[str, Any], data: Any) -> str:
    """Everything that determines the trained weights: method, options, world, model and data."""
    return f"{method}-" + cache_key(method, context.seed, context.generator.fingerprint(), options, data)[:20]


def existing_artifacts(method: str, path: Path | None) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_dir():
        raise ConfigError(f"{method}: artifacts folder not found: {path}")
    return Path(path)


def training_request(prompt: str) -> GenerationRequest:
    """The request a training response is scored under: the user's prompt, nothing personal."""
    return GenerationRequest(chat(prompt), seed=0, params=SamplingParams())


def scored_candidates(context: FitContext, user: FitUser) -> list[tuple[str, float]]:
    """The user's candidates and their feedback, best first (unscorable ones left out)."""
    scores = context.feedback.scores(user.id)
    texts = [c.text for c in context.feedback.candidates(user.id)]
    order = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable") if not np.isnan(scores[i])]
    return [(texts[i], float(scores[i])) for i in order]


def ranked_candidates(context: FitContext, user: FitUser) -> list[str]:
    """The user's candidates from best to worst by their feedback (unscorable ones left out)."""
    return [text for text, _ in scored_candidates(context, user)]


def history_features(context: FitContext, users: Sequence[FitUser]) -> np.ndarray:
    return context.embedder.embed_histories([u.history for u in users])
