"""soft-prompt and cbpo: they train for real (sim and a tiny hf model), save artifacts in the forms
PEFT and vLLM read, and reuse them instead of training again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_context import world_zero

from apm_bench.backends.base import AdapterRef, GenerationRequest, SamplingParams, SoftPrompt, chat
from apm_bench.methods.base import UserView
from apm_bench.methods.cbpo import LABELS_FILE, Cbpo, CbpoUncorrected
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.soft_prompt import ADAPTER_FOLDER, SOFT_PROMPTS, SoftPromptMethod, load_soft_prompts
from apm_bench.reporting.results import write_run
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _test_users(world, n: int = 20) -> list[UserView]:  # type: ignore[no-untyped-def]
    return [UserView(u, tuple(world.users[u].history)) for u in world.split.test[:n]]


# -------------------------------------------------------------------------------------------- sim


def test_soft_prompt_trains_saves_and_is_reused(embedder: HistoryEmbedder, tmp_path: Path) -> None:
    engines, _, world, context = world_zero(embedder, artifacts=tmp_path / "store")
    method = SoftPromptMethod(epochs=8)
    method.fit(context)
    record = method.training_records()[0]
    assert not record.reused and record.steps > 0 and record.losses[-1] < record.losses[0]
    folder = tmp_path / "store" / record.name
    assert (folder / ADAPTER_FOLDER).is_dir() and (folder / "projector.safetensors").is_file()
    users = _test_users(world)
    out = method.personalize_many(users, ["Explain tides."] * len(users))
    tokens = np.stack([p.soft_prompt.embeddings for p in out])  # type: ignore[union-attr]
    assert tokens.shape == (len(users), 1, engines.generator.soft_prompt_width)
    assert np.ptp(tokens, axis=0).max() > 1e-3  # users with different histories get different tokens
    assert all(p.adapter == AdapterRef(record.name, str(folder / ADAPTER_FOLDER)) for p in out)
    exported = load_soft_prompts(folder / SOFT_PROMPTS)
    assert sorted(exported) == sorted(u.id for u in users)
    assert np.allclose(exported[users[0].id], tokens[0])

    again = SoftPromptMethod(epochs=8)
    again.fit(context)  # same data, options, world and model: loaded, not retrained
    assert again.training_records()[0].reused and again.training_records()[0].steps == 0
    assert np.allclose(np.stack([p.soft_prompt.embeddings for p in again.personalize_many(users, ["x"] * len(users))]), tokens)  # type: ignore[union-attr]
    other = SoftPromptMethod(epochs=9)
    other.fit(context)  # other options: trained afresh
    assert not other.training_records()[0].reused
    engines.close()


def test_cbpo_trains_one_adapter_per_label_and_routes_users_to_them(embedder: HistoryEmbedder, tmp_path: Path) -> None:
    engines, _, world, context = world_zero(embedder, artifacts=tmp_path / "store")
    corrected, uncorrected = Cbpo(epochs=6), CbpoUncorrected(epochs=6)
    corrected.fit(context)
    uncorrected.fit(context)
    assert set(corrected.adapters) == set(uncorrected.adapters) and len(corrected.adapters) >= 3
    assert all(0.0 <= p < 1.0 for p in corrected.priors.values()) and max(corrected.priors.values()) > 0.0
    assert set(uncorrected.priors.values()) == {0.0}
    folder = Path(next(iter(corrected.adapters.values())).path).parent  # type: ignore[arg-type]
    saved = json.loads((folder / LABELS_FILE).read_text())
    assert len(saved) == len(corrected.adapters)
    # an adapter moves generation towards its label's style
    label_index, adapter = next((i, a) for i, a in corrected.adapters.items() if context.feedback.labels[i].side == "follow")
    principle = context.feedback.labels[label_index].principle
    column = [p.id for p in context.principles].index(principle)
    level = engines.generator.codec.levels

    def mean_level(ref: AdapterRef | None) -> float:
        requests = [GenerationRequest(chat("Explain how tides work."), seed=s, adapter=ref) for s in range(300)]
        return float(np.mean([level(g.text)[column] for g in engines.generator.generate(requests)]))

    assert mean_level(adapter) > mean_level(None) + 0.3
    users = _test_users(world, 40)
    routed = corrected.personalize_many(users, ["Explain tides."] * len(users))
    labels = corrected.router.predict_labels([u.history for u in users])
    assert [p.adapter for p in routed] == [corrected.adapters.get(int(l)) for l in labels]
    assert sum(p.adapter is not None for p in routed) > len(users) // 2
    reused = Cbpo(epochs=6)
    reused.fit(context)
    assert all(r.reused for r in reused.training_records()) and reused.adapters == corrected.adapters
    engines.close()


def test_a_run_records_training_and_a_rerun_reuses_the_artifacts(embedder: HistoryEmbedder, tmp_path: Path) -> None:
    config = RunConfig(methods=["soft-prompt"], worlds=[0], users=120, cache=tmp_path / "cache" / "calls.sqlite",
                       out=tmp_path / "runs", method_options={"soft-prompt": {"epochs": 6}})
    shown: list[str] = []
    first = run_benchmark(config, progress=lambda stage, done, total: shown.append(stage), embedder=embedder)
    training_lines = [line for line in shown if "training soft-prompt-" in line]
    assert training_lines and training_lines[-1].startswith("world 0: soft-prompt: training") and ", loss " in training_lines[-1]
    folder = write_run(first, 1.0)
    record = json.loads((folder / "metrics.json").read_text())
    assert record["costs"]["fit:soft-prompt"]["training_steps"] > 0
    assert [t["reused"] for t in record["training"]] == [False]
    assert (folder / "training.png").stat().st_size > 1000 and "## Training" in (folder / "report.md").read_text()
    assert len(json.loads((folder / "training.json").read_text())[0]["losses"]) == record["training"][0]["steps"]
    artifact = folder / "artifacts" / record["artifacts"][0]
    assert (artifact / ADAPTER_FOLDER / "sim_adapter.pt").is_file() and (artifact / SOFT_PROMPTS).is_file()

    second = run_benchmark(config, embedder=embedder)  # e.g. resuming after a crash: nothing is retrained
    assert [t["reused"] for t in second.training] == [True]
    assert second.costs["fit:soft-prompt"]["training_steps"] == 0
    assert second.samples["reward"].tolist() == first.samples["reward"].tolist()


# -------------------------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_lm import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def hf(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from apm_bench.backends.hf import HFBackend

    torch.set_num_threads(1)
    return HFBackend(str(tiny_model_dir), batch_size=8)


GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _greedy(backend, prompt: str, adapter: AdapterRef | None = None, soft: SoftPrompt | None = None) -> str:  # type: ignore[no-untyped-def]
    return backend.generate([GenerationRequest(chat(prompt), seed=0, params=GREEDY, adapter=adapter, soft_prompt=soft)])[0].text


def _check_peft_folder(folder: Path, tiny_model_dir: Path) -> None:
    """The layout `PeftModel.from_pretrained` and vLLM's LoRARequest(lora_path=...) read."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] <= max(VLLM_LORA_RANKS)
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if ".lora_B." in k)  # trained: B left zero
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(folder))
    state = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        match = [v for k, v in state.items() if k.replace(".default", "") == key]
        assert match and torch.equal(match[0], value)


def test_soft_prompt_trains_on_a_tiny_hf_model_and_exports_for_vllm(hf, tiny_model_dir: Path, embedder: HistoryEmbedder,
                                                                     tmp_path: Path) -> None:
    from apm_bench.backends.hf import HFBackend
    from apm_bench.backends.vllm import embeds_prompt

    engines, _, world, context = world_zero(embedder, generator=hf, n_train=6, artifacts=tmp_path / "store")
    method = SoftPromptMethod(epochs=2, hidden=16, rank=8, batch_size=6, learning_rate=0.05)
    method.fit(context)
    record = method.training_records()[0]
    assert record.steps == 2 and len(record.losses) == 2
    users = _test_users(world, 3)
    out = method.personalize_many(users, ["Tell me a story."] * 3)
    assert out[0].adapter is not None and out[0].soft_prompt is not None
    _check_peft_folder(Path(out[0].adapter.path), tiny_model_dir)  # type: ignore[arg-type]
    assert _greedy(hf, "Tell me a story.", out[0].adapter, out[0].soft_prompt) != _greedy(hf, "Tell me a story.")
    # a fresh engine loads the saved adapter from disk and answers exactly as the trained one does
    fresh = HFBackend(str(tiny_model_dir), batch_size=8)
    assert _greedy(fresh, "Tell me a story.", out[0].adapter, out[0].soft_prompt) == _greedy(hf, "Tell me a story.", out[0].adapter, out[0].soft_prompt)
    # soft prompts: (m, hidden) float32 rows that go in front of the prompt's token embeddings
    exported = load_soft_prompts(Path(out[0].adapter.path).parent / SOFT_PROMPTS)  # type: ignore[arg-type]
    rows = exported[users[0].id]
    assert rows.shape == (1, hf.hidden_size) and rows.dtype == np.float32
    prompt_rows = torch.zeros(5, hf.hidden_size, dtype=torch.bfloat16)
    combined = embeds_prompt(prompt_rows, rows)
    assert combined.shape == (6, hf.hidden_size) and combined.dtype == torch.bfloat16
    engines.close()


def test_cbpo_trains_on_a_tiny_hf_model(hf, tiny_model_dir: Path, embedder: HistoryEmbedder, tmp_path: Path) -> None:
    engines, _, world, context = world_zero(embedder, generator=hf, n_train=6, artifacts=tmp_path / "store")
    method = Cbpo(epochs=2, min_users=1, rank=8, batch_size=8, learning_rate=0.1)
    method.fit(context)
    assert method.adapters and all(r.steps == 2 for r in method.training_records())
    adapter = next(iter(method.adapters.values()))
    _check_peft_folder(Path(adapter.path), tiny_model_dir)  # type: ignore[arg-type]
    sampled = SamplingParams(temperature=1.0, max_tokens=12)
    plain = [GenerationRequest(chat("Tell me a story."), seed=s, params=sampled) for s in range(4)]
    through = [GenerationRequest(chat("Tell me a story."), seed=s, params=sampled, adapter=adapter) for s in range(4)]
    assert [g.text for g in hf.generate(through)] != [g.text for g in hf.generate(plain)]
    engines.close()


@pytest.mark.gpu
def test_vllm_serves_trained_artifacts(tiny_model_dir: Path, embedder: HistoryEmbedder, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the vllm backend runs only on GPUs")
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'apm-bench[vllm]')")
    from apm_bench.backends.hf import HFBackend
    from apm_bench.backends.vllm import VLLMBackend

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    hf = HFBackend(str(tiny_model_dir), batch_size=8)
    engines, _, world, context = world_zero(embedder, generator=hf, n_train=6, artifacts=tmp_path / "store")
    soft = SoftPromptMethod(epochs=2, hidden=16, rank=8, batch_size=6, learning_rate=0.05)
    soft.fit(context)
    cbpo = Cbpo(epochs=1, min_users=1, rank=8)
    cbpo.fit(context)
    personal = soft.personalize_many(_test_users(world, 2), ["Tell me a story."] * 2)[0]
    engine = VLLMBackend(str(tiny_model_dir), enable_lora=True, max_lora_rank=8, max_loras=4, enable_prompt_embeds=True,
                         gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True, dtype="float32")
    try:
        adapters = [personal.adapter, *list(cbpo.adapters.values())[:2]]
        requests = [GenerationRequest(chat("Tell me a story."), 0, GREEDY)]
        requests += [GenerationRequest(chat("Tell me a story."), 0, GREEDY, adapter=a) for a in adapters]
        requests += [GenerationRequest(chat("Tell me a story."), 0, GREEDY, adapter=personal.adapter, soft_prompt=personal.soft_prompt)]
        texts = [g.text for g in engine.generate(requests)]  # one engine, several adapters, no reload
        assert len(texts) == 5 and all(texts)
        assert texts[-1] != texts[0]
    finally:
        engine.close()
        engines.close()


def test_soft_prompt_presets_resolve_by_engine_and_explicit_options_win() -> None:
    from apm_bench.methods.soft_prompt import SoftPromptOptions, resolve_settings

    paper = resolve_settings(SoftPromptOptions(), simulated=False)
    assert (paper.loss, paper.beta, paper.gamma, paper.activation, paper.hidden) == ("simpo", 2.0, 1.0, "gelu", None)
    assert (paper.lora_alpha, paper.lora_dropout, paper.lora_targets) == (32.0, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (paper.optimizer, paper.learning_rate, paper.epochs, paper.batch_size, paper.grad_accum, paper.clip) == (
        "adamw", 5e-5, 1, 1, 8, 1.0)
    assert paper.max_response_tokens == 1024 and paper.greedy
    assert resolve_settings(SoftPromptOptions(loss="dpo"), simulated=False).beta == 0.1  # the authors' DPO β
    sim = resolve_settings(SoftPromptOptions(), simulated=True)
    assert (sim.loss, sim.beta, sim.epochs, sim.learning_rate, sim.optimizer, sim.greedy) == ("dpo", 0.5, 40, 0.01, "adam", False)
    forced = resolve_settings(SoftPromptOptions(preset="paper", epochs=3), simulated=True)
    assert forced.epochs == 3 and forced.optimizer == "adamw" and forced.max_response_tokens is None  # no tokens to cut


def test_optimise_accumulates_gradients_and_clips_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from apm_bench.methods.training import OptimiserSettings, optimise

    clipped: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):  # type: ignore[no-untyped-def]
        parameters = list(parameters)
        clipped.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))))
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    weight = torch.nn.Parameter(torch.zeros(3))
    settings = OptimiserSettings(epochs=1, learning_rate=0.1, batch_size=1, grad_accum=4, clip=1.0, optimizer="adamw")
    record = optimise("toy", [weight], lambda batch: (1000.0 * (weight - 1.0) ** 2).sum() * len(batch), 10, settings)
    assert (len(record.losses), record.steps) == (10, 3)  # 4 + 4 + the last 2
    assert len(clipped) == 3 and clipped[0] > 1.0  # the accumulated gradient, before clipping
    assert float(weight.detach().abs().max()) > 0  # the steps moved it


def test_soft_prompt_trains_with_the_authors_settings_on_a_tiny_hf_model(hf, embedder: HistoryEmbedder, tmp_path: Path) -> None:
    engines, _, world, context = world_zero(embedder, generator=hf, n_train=10, artifacts=tmp_path / "store")
    method = SoftPromptMethod()  # auto: hf trains, so the paper preset
    method.fit(context)
    assert method.settings is not None and method.settings.loss == "simpo" and not hf.lm.training  # eval mode again
    record = method.training_records()[0]
    assert record.steps == -(-len(record.losses) // 8) and len(record.losses) == record.examples  # batch 1 × 8
    config = json.loads((Path(method.adapter.path) / "adapter_config.json").read_text())  # type: ignore[union-attr, arg-type]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert method.projector is not None and isinstance(method.projector.activation, torch.nn.GELU)
    assert method.projector.shape["hidden"] == hf.hidden_size == method.projector.shape["width"]
    out = method.personalize_many(_test_users(world, 2), ["Tell me a story."] * 2)
    assert all(p.temperature == 0.0 for p in out)  # greedy test decoding
    engines.close()
