"""The engine budget of a run: how many engines that hold device memory may be loaded at once.

A 27B generator and a 120B judge do not fit one GPU together, and on one node two engines at
`gpu_memory_utilization` 0.92 cannot both start. Engines that hold device memory (vLLM) load
lazily and ask the budget first; when it is full, the least recently used engine is released
(its memory freed) before the new one loads. Released engines load again when next used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol


class Releasable(Protocol):
    model: str

    def release(self) -> None: ...


class EngineBudget:
    def __init__(self, limit: int = 1) -> None:
        if limit < 1:
            raise ValueError("an engine budget needs room for at least one engine")
        self.limit = limit
        self._resident: OrderedDict[int, Releasable] = OrderedDict()
        self.loads = 0
        self.releases = 0
        self.max_resident = 0
        #: one line per load or release, in order (for the report and for tests)
        self.events: list[str] = []

    def admit(self, engine: Releasable) -> None:
        """Called by an engine right before it loads: make room, then count it resident."""
        key = id(engine)
        if key in self._resident:
            self._resident.move_to_end(key)
            return
        while len(self._resident) >= self.limit:
            _, oldest = self._resident.popitem(last=False)
            oldest.release()
            self.releases += 1
            self.events.append(f"release {oldest.model}")
        self._resident[key] = engine
        self.loads += 1
        self.max_resident = max(self.max_resident, len(self._resident))
        self.events.append(f"load {engine.model}")

    def touch(self, engine: Releasable) -> None:
        """Called on every use, so the least recently used engine is the one released."""
        if id(engine) in self._resident:
            self._resident.move_to_end(id(engine))

    def forget(self, engine: Releasable) -> None:
        """Called when an engine releases itself (close): it no longer takes room."""
        self._resident.pop(id(engine), None)

    @property
    def resident(self) -> int:
        return len(self._resident)

    def snapshot(self) -> dict[str, float]:
        return {"engine_loads": float(self.loads), "engine_releases": float(self.releases),
                "max_engines_resident": float(self.max_resident), "engine_budget": float(self.limit)}


class LazyEngine:
    """An engine that is built only when first asked for, under the budget, and dropped whole when
    the budget needs its room (it is built again on the next request). The trainer of a vLLM run
    is one: transformers loads the generator's weights to train adapters, and the vLLM engine that
    serves them is released first."""

    def __init__(self, model: str, build: Callable[[], Any], budget: EngineBudget) -> None:
        self.model = model
        self._build = build
        self._budget = budget
        self._engine: Any = None

    def __call__(self) -> Any:
        if self._engine is None:
            self._budget.admit(self)
            self._engine = self._build()
        else:
            self._budget.touch(self)
        return self._engine

    def release(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def close(self) -> None:
        self.release()
        self._budget.forget(self)
