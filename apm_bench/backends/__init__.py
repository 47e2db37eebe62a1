"""Stage 2, engines: the backend interface, the engines behind it, and the model alias table.

`load_backend(model, catalog)` resolves an alias from `apm_bench/data/models.yaml` (or takes a hub
id / local path as it is) and builds the engine named there. Engines register a factory by name
and import their heavy libraries only when built, so `apm --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import import_module, resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from apm_bench.backends.base import Backend
from apm_bench.errors import ConfigError, UnknownNameError
from apm_bench.inputs import parse_yaml
from apm_bench.registry import Registry
from apm_bench.world.catalog import Catalog


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str
    backend: str
    description: str = ""
    model_id: str | None = Field(default=None, description="hub id or local path the engine loads")
    sim: dict[str, Any] | None = None
    engine: dict[str, Any] = Field(default_factory=dict, description="engine options, e.g. chat_template_kwargs")


BackendFactory = Callable[[ModelSpec, Catalog, int, dict[str, Any]], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend")


@BACKENDS.register("sim")
def _build_sim(spec: ModelSpec, catalog: Catalog, seed: int, options: dict[str, Any]) -> Backend:
    from apm_bench.backends.sim import SimBackend
    from apm_bench.sim.profile import SimProfile

    if spec.sim is None:
        raise ConfigError(f"model {spec.alias!r} has no simulator profile; the sim backend runs only sim-* models")
    return SimBackend(spec.alias, SimProfile.model_validate(spec.sim), catalog, seed=seed)


def _engine_factory(module: str, class_name: str) -> BackendFactory:
    """Real engines take the model id plus engine options (alias defaults, then user options)."""

    def build(spec: ModelSpec, catalog: Catalog, seed: int, options: dict[str, Any]) -> Backend:
        engine_class = getattr(import_module(module), class_name)
        return engine_class(spec.model_id or spec.alias, **{**spec.engine, **options})

    return build


BACKENDS.add("hf", _engine_factory("apm_bench.backends.hf", "HFBackend"))
BACKENDS.add("openai", _engine_factory("apm_bench.backends.openai_compat", "OpenAIBackend"))
BACKENDS.add("vllm", _engine_factory("apm_bench.backends.vllm", "VLLMBackend"))


@lru_cache(maxsize=1)
def model_registry() -> Registry[ModelSpec]:
    text = resources.files("apm_bench.data").joinpath("models.yaml").read_text(encoding="utf-8")
    registry: Registry[ModelSpec] = Registry("model")
    for alias, entry in parse_yaml(text)["models"].items():
        registry.add(alias, ModelSpec(alias=alias, **entry))
    return registry


def looks_like_model_id(name: str) -> bool:
    """A hub id ('org/name') or a filesystem path, as opposed to a mistyped alias."""
    return "/" in name or name.startswith((".", "~"))


def resolve_model(name: str, backend: str | None = None) -> ModelSpec:
    """An alias gives its spec (its backend unless one is forced); a hub id or path needs a backend."""
    registry = model_registry()
    if name in registry:
        spec = registry.get(name)
        return spec if backend is None or backend == spec.backend else spec.model_copy(update={"backend": backend})
    if backend is not None or looks_like_model_id(name):
        return ModelSpec(alias=name, backend=backend or "vllm", model_id=name)
    return registry.get(name)  # raises with a did-you-mean


def load_backend(
    model: str, catalog: Catalog, seed: int = 0, backend: str | None = None, options: dict[str, Any] | None = None
) -> Backend:
    spec = resolve_model(model, backend)
    if spec.backend not in BACKENDS:
        raise UnknownNameError(f"unknown backend {spec.backend!r}; known: {', '.join(BACKENDS.names())}")
    return BACKENDS.get(spec.backend)(spec, catalog, seed, dict(options or {}))
