"""A backend behind the persistent cache: same interface, each distinct request computed once."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from apm_bench.backends.base import Backend, Generation, GenerationRequest
from apm_bench.cache import CacheStats, CallCache, cache_key


def request_key(fingerprint: str, request: GenerationRequest) -> str:
    """Backend, model, adapter, params, seed and messages; soft prompts by a hash of their values."""
    soft = None
    if request.soft_prompt is not None:
        embeddings = np.ascontiguousarray(request.soft_prompt.embeddings, dtype=np.float32)
        soft = [list(embeddings.shape), cache_key(embeddings.tobytes().hex())]
    params = _shallow(request.params)  # asdict's deep copies cost more than the hash itself
    if params["choices"] is None:
        del params["choices"]  # keys of unconstrained requests stay what they were before constraints existed
    parts: list[object] = [
        "generation",
        fingerprint,
        [(m.role, m.content) for m in request.messages],
        request.seed,
        params,
        dataclasses.asdict(request.adapter) if request.adapter else None,
        soft,
    ]
    if request.prefill is not None:
        parts.append({"prefill": request.prefill})
    return cache_key(*parts)


def _shallow(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def _to_json(generation: Generation) -> dict[str, Any]:
    data = dataclasses.asdict(generation)
    data["top_logprobs"] = list(generation.top_logprobs) if generation.top_logprobs is not None else None
    return data


def _from_json(data: dict[str, Any]) -> Generation:
    top = data.get("top_logprobs")
    return Generation(**{**data, "top_logprobs": tuple(top) if top is not None else None})


class CachedBackend(Backend):
    def __init__(self, inner: Backend, cache: CallCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.model = inner.model
        self.capabilities = inner.capabilities
        self.stats = CacheStats()
        self._fingerprint = inner.fingerprint()

    def fingerprint(self) -> str:
        return self._fingerprint

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        keys = [request_key(self._fingerprint, r) for r in requests]

        def compute(indices: list[int]) -> list[Any]:
            return [_to_json(g) for g in self.inner.generate([requests[i] for i in indices])]

        values = self.cache.get_or_compute(keys, "generation", compute, self.stats)
        return [_from_json(v) for v in values]  # type: ignore[arg-type]

    def context_window(self) -> int | None:
        return self.inner.context_window()

    def prompt_tokens(self, request: GenerationRequest) -> int:
        return self.inner.prompt_tokens(request)

    def __getattr__(self, attribute: str) -> Any:
        """Training methods reach the engine itself (policy, model) through the wrapper."""
        return getattr(self.inner, attribute)

    def close(self) -> None:
        self.inner.close()
