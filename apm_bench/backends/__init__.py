"""Backends and the model alias table.

`load_backend(model, catalog)` resolves an alias from `apm_bench/data/models.yaml` and builds the
engine named there. Engines register a factory by name and import their heavy libraries only
when built, so `apm --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from apm_bench.backends.base import Backend
from apm_bench.catalog import Catalog
from apm_bench.registry import Registry


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str
    backend: str
    description: str = ""
    sim: dict[str, Any] | None = None


BackendFactory = Callable[[ModelSpec, Catalog, int], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend")


@BACKENDS.register("sim")
def _build_sim(spec: ModelSpec, catalog: Catalog, seed: int) -> Backend:
    from apm_bench.backends.sim import SimBackend
    from apm_bench.sim.policy import SimProfile

    return SimBackend(spec.alias, SimProfile.model_validate(spec.sim or {}), catalog, seed=seed)


@lru_cache(maxsize=1)
def model_registry() -> Registry[ModelSpec]:
    text = resources.files("apm_bench.data").joinpath("models.yaml").read_text(encoding="utf-8")
    registry: Registry[ModelSpec] = Registry("model")
    for alias, entry in yaml.safe_load(text)["models"].items():
        registry.add(alias, ModelSpec(alias=alias, **entry))
    return registry


def resolve_model(name: str) -> ModelSpec:
    return model_registry().get(name)


def load_backend(model: str, catalog: Catalog, seed: int = 0) -> Backend:
    spec = resolve_model(model)
    return BACKENDS.get(spec.backend)(spec, catalog, seed)
