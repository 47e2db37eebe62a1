"""The engines of a run: roles, shared engines, and the engine budget."""

from __future__ import annotations

from typing import Any

import pytest

from apm_bench.backends import vllm as vb
from apm_bench.backends.budget import EngineBudget, LazyEngine
from apm_bench.errors import ConfigError
from apm_bench.run.config import RunConfig
from apm_bench.run.engines import build_engines, check_roles, role_engines
from apm_bench.world.catalog import Catalog


def test_roles_a_real_generator_cannot_leave_simulated() -> None:
    with pytest.raises(ConfigError, match="candidate writer, history writer, judge would be simulated"):
        check_roles(RunConfig(model="/models/tiny", backend="hf"))
    with pytest.raises(ConfigError, match="the judge would be simulated"):
        check_roles(RunConfig(model="Qwen/Qwen3.5-27B", backend="openai", candidate_model="Qwen/Qwen3.5-27B",
                              candidate_backend="openai", writer_model="Qwen/Qwen3.5-27B"))
    check_roles(RunConfig(model="/models/tiny", backend="hf", allow_simulated_roles=True))  # said explicitly
    check_roles(RunConfig())  # the simulator with simulated roles is the default benchmark
    check_roles(RunConfig(backend="openai", base_url="http://127.0.0.1:1/v1"))  # the simulator served over HTTP


def test_role_presets_fill_only_the_roles_left_unset() -> None:
    same = RunConfig(model="/models/tiny", backend="vllm", roles="same")
    assert {r: (e.model, e.backend) for r, e in role_engines(same).items()} == {
        role: ("/models/tiny", "vllm") for role in ("generator", "candidate writer", "history writer", "judge")}
    paper = RunConfig(model="qwen3.5-27b", roles="paper", judge_model="llama-3.1-8b")
    roles = role_engines(paper)
    assert roles["judge"].model == "llama-3.1-8b"  # set explicitly: the preset leaves it
    assert roles["history writer"].model == "gpt-oss-120b" and roles["candidate writer"].model == "qwen3.5-27b"
    served = RunConfig(model="m", backend="openai", base_url="http://h/v1", roles="same")
    assert role_engines(served)["judge"].url == "http://h/v1"
    check_roles(same)
    check_roles(paper)


def test_roles_on_one_engine_share_it(catalog: Catalog, tmp_path: Any) -> None:
    engines = build_engines(RunConfig(roles="same", cache=tmp_path / "calls.sqlite"), catalog)
    try:
        assert len(engines.backends) == 1
        assert engines.generator is engines.candidate_writer
        assert engines.judge.inner.backend is engines.generator  # type: ignore[attr-defined]
    finally:
        engines.close()
    engines = build_engines(RunConfig(cache=None), catalog)
    assert len(engines.backends) == 1 and engines.generator is engines.candidate_writer  # default: sim judge, sim writer
    engines.close()


class _Engine:
    def __init__(self, model: str) -> None:
        self.model = model
        self.released = 0

    def release(self) -> None:
        self.released += 1


def test_budget_releases_the_least_recently_used_engine() -> None:
    budget = EngineBudget(2)
    a, b, c = _Engine("a"), _Engine("b"), _Engine("c")
    budget.admit(a)
    budget.admit(b)
    budget.touch(a)
    budget.admit(c)  # b was used least recently
    assert (a.released, b.released, c.released) == (0, 1, 0)
    assert budget.snapshot() == {"engine_loads": 3.0, "engine_releases": 1.0, "max_engines_resident": 2.0, "engine_budget": 2.0}
    assert budget.events == ["load a", "load b", "release b", "load c"]
    with pytest.raises(ValueError):
        EngineBudget(0)


def test_vllm_engines_load_lazily_and_never_two_under_a_budget_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    alive: list[str] = []
    most = [0]

    class Engine:
        def __init__(self, model: str, **kwargs: Any) -> None:
            alive.append(model)
            most[0] = max(most[0], len(alive))
            self.model = model

        def get_tokenizer(self) -> Any:
            return None

    monkeypatch.setattr(vb, "import_vllm", lambda: vb.VLLMApi(LLM=Engine, SamplingParams=dict, LoRARequest=tuple))
    monkeypatch.setattr(vb, "vllm_platform", lambda: "cuda")
    original_release = vb.VLLMBackend.release

    def release(self: vb.VLLMBackend) -> None:
        if self._llm is not None:
            alive.remove(self.model)
        original_release(self)

    monkeypatch.setattr(vb.VLLMBackend, "release", release)
    budget = EngineBudget(1)
    generator, judge = vb.VLLMBackend("generator"), vb.VLLMBackend("judge")
    for backend in (generator, judge):
        backend.bind_budget(budget)
    assert alive == []  # nothing loads before it is used
    for backend in (generator, judge, judge, generator):
        backend._engine()
    assert most[0] == 1 and budget.loads == 3 and budget.releases == 2
    generator.close()
    judge.close()
    assert alive == [] and budget.resident == 0


def test_a_lazy_engine_is_built_on_first_use_and_dropped_for_another() -> None:
    built: list[_Closable] = []

    class _Closable:
        closed = False

        def close(self) -> None:
            self.closed = True

    def build() -> _Closable:
        built.append(_Closable())
        return built[-1]

    budget = EngineBudget(1)
    trainer = LazyEngine("model (training)", build, budget)
    assert built == [] and budget.loads == 0  # nothing until a method trains
    first = trainer()
    assert trainer() is first and len(built) == 1 and budget.resident == 1
    budget.admit(_Engine("generator"))  # serving the trained weights needs the room
    assert first.closed and budget.releases == 1
    second = trainer()  # asked again: built again, and the generator makes room in turn
    assert second is not first and budget.loads == 3 and budget.max_resident == 1
    trainer.close()
    assert second.closed and budget.resident == 0


def test_engine_options_are_per_role_and_roles_share_only_equal_engines() -> None:
    config = RunConfig(model="/models/gen", backend="vllm", roles="same", judge_model="/models/judge",
                       judge_backend="vllm", engine_options={"generator": {"max_model_len": 2048},
                                                             "judge": {"tensor_parallel_size": 8}})
    roles = role_engines(config)
    # roles on the generator's model without options of their own take its options: one engine
    assert roles["candidate writer"] == roles["history writer"] == roles["generator"]
    assert roles["generator"].engine_options() == {"max_model_len": 2048}
    assert roles["judge"].engine_options() == {"tensor_parallel_size": 8}
    split = role_engines(config.model_copy(update={"engine_options": {
        "generator": {"max_model_len": 2048}, "history_writer": {"max_model_len": 8192}}}))
    assert split["history writer"] != split["generator"]  # other options: an engine of its own
    served = role_engines(RunConfig(model="m", backend="openai", base_url="http://h/v1", roles="same",
                                    engine_options={"judge": {"structured_outputs": True}}))
    assert served["judge"].engine_options() == {"structured_outputs": True, "base_url": "http://h/v1"}
    with pytest.raises(ValueError, match="engine_options"):
        RunConfig(engine_options={"critic": {}})
