"""Stage 2, engines: the backend interface, the engines behind it, and the model alias table.

`load_backend(model, catalog)` resolves an alias from `apm_bench/data/models.yaml` (or takes a hub
id / local path as it is) and builds the engine named there. Engines register a factory by name
and import their heavy libraries only when built, so `apm --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import import_module, resources
from pathlib import Path
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
    engine_by_backend: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options for one engine only, over `engine` (e.g. {vllm: {max_model_len: 2048}})")
    sim_language: bool = Field(
        default=False, description="trained on the simulator's answers: it writes the simulator's marker phrases, "
                                   "so the simulator's judge and history writer are meaningful partners for it")
    bundled: str | None = Field(
        default=None, description="a model folder shipped in apm_bench/data: in-process engines load it from "
                                  "there; over HTTP (openai) the server is asked for it by its alias")

    def options(self) -> dict[str, Any]:
        """The alias's engine options for the engine it runs on."""
        return {**self.engine, **self.engine_by_backend.get(self.backend, {})}

    def weights(self) -> str:
        """What an in-process engine loads: the shipped folder, the hub id or path, else the alias."""
        if self.bundled is not None:
            return str(bundled_model(self.bundled))
        return self.model_id or self.alias


BackendFactory = Callable[[ModelSpec, Catalog, int, dict[str, Any]], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend")


@BACKENDS.register("sim")
def _build_sim(spec: ModelSpec, catalog: Catalog, seed: int, options: dict[str, Any]) -> Backend:
    from apm_bench.backends.sim import SimBackend
    from apm_bench.sim.profile import SimProfile

    if spec.sim is None:
        raise ConfigError(f"model {spec.alias!r} has no simulator profile; the sim backend runs only sim-* models")
    return SimBackend(spec.alias, SimProfile.model_validate(spec.sim), catalog, seed=seed)


def bundled_path(name: str) -> Path:
    """Where the package keeps the model folder `name` (apm_bench/data/<name>), built or not."""
    return Path(str(resources.files("apm_bench.data").joinpath(name)))


def bundled_model(name: str) -> Path:
    """A model folder shipped in the package (`apm tiny-model build` makes apm-tiny's)."""
    folder = bundled_path(name)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"the bundled model {name!r} is missing from {folder}: build it with `apm tiny-model build`")
    return folder


def _engine_factory(module: str, class_name: str, in_process: bool = True) -> BackendFactory:
    """Real engines take the model's weights (in process) or its served name (over HTTP), plus
    engine options (the alias's, then the user's)."""

    def build(spec: ModelSpec, catalog: Catalog, seed: int, options: dict[str, Any]) -> Backend:
        engine_class = getattr(import_module(module), class_name)
        model = spec.weights() if in_process else spec.model_id or spec.alias
        return engine_class(model, **{**spec.options(), **options})

    return build


BACKENDS.add("hf", _engine_factory("apm_bench.backends.hf", "HFBackend"))
BACKENDS.add("openai", _engine_factory("apm_bench.backends.openai_compat", "OpenAIBackend", in_process=False))
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
