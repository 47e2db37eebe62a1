"""φ's onnx-int8 backend: an export of the packaged encoder, cached, that agrees with torch's φ.

The module exports once into a temporary model cache (~10 s) and loads the torch encoder once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apm_bench.cache import CallCache, cache_key
from apm_bench.errors import ConfigError
from apm_bench.methods import embedder as embedder_module
from apm_bench.methods import onnx_encoder
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.methods.onnx_encoder import ExportSettings, OnnxEncoder, export_key
from apm_bench.run.config import RunConfig, load_config
from apm_bench.run.setup import prepare

pytestmark = pytest.mark.skipif(not onnx_encoder.onnx_available(), reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """~50 distinct messages of simulated histories, of every length the simulator writes."""
    _, population = prepare(RunConfig(users=12, cache=None))
    messages = list(dict.fromkeys(m for user in population.users for m in user.history))
    assert len(messages) >= 50
    return messages[:50]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def exporting(model_dir: Path) -> OnnxEncoder:
    """The first encoder on an empty model cache: it exports."""
    encoder = OnnxEncoder(cache_dir=model_dir)
    encoder._load()
    return encoder


@pytest.fixture(scope="module")
def torch_embedder() -> HistoryEmbedder:
    return HistoryEmbedder(backend="torch")


@pytest.fixture(scope="module")
def torch_vectors(torch_embedder: HistoryEmbedder, texts: list[str]) -> np.ndarray:
    return torch_embedder.embed_texts(texts)


def test_int8_vectors_agree_with_torch(exporting: OnnxEncoder, texts: list[str], torch_vectors: np.ndarray) -> None:
    assert exporting.exported and exporting.model_file.is_file()
    vectors = exporting.encode(texts)
    assert vectors.shape == torch_vectors.shape == (50, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(vectors * torch_vectors, axis=1)
    assert cosine.min() >= 0.97 and cosine.mean() >= 0.99, (cosine.min(), cosine.mean())
    assert cosine.max() < 0.99999  # int8 really ran: the backends' vectors are close, not equal


def test_a_second_load_reuses_the_export(exporting: OnnxEncoder, model_dir: Path, texts: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    written = exporting.model_file.stat().st_mtime_ns

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_encoder, "export_int8", no_export)
    again = OnnxEncoder(cache_dir=model_dir)
    assert np.array_equal(again.encode(texts), exporting.encode(texts))
    assert not again.exported
    assert again.model_file.stat().st_mtime_ns == written
    assert [p.name for p in model_dir.iterdir()] == [exporting.model_file.name]  # no temporary files left


def test_the_export_key_follows_the_weights_and_the_settings(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    before = export_key(model)
    assert export_key(model, ExportSettings(per_channel=False)) != before
    export_key.cache_clear()  # the key is memoised per process; a changed file is a new package
    (model / "model.safetensors").write_bytes(b"\x01" * 64)
    assert export_key(model) != before


def test_backends_never_share_cached_vectors(exporting: OnnxEncoder, model_dir: Path, texts: list[str],
                                             torch_embedder: HistoryEmbedder, torch_vectors: np.ndarray,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APM_MODEL_CACHE", str(model_dir))
    cache = CallCache(tmp_path / "calls.sqlite")
    sample = texts[:10]
    first = HistoryEmbedder(cache=cache, backend="onnx-int8")
    int8 = first.embed_texts(sample)
    reference = HistoryEmbedder(cache=cache, backend="torch")
    reference._model = torch_embedder._load()  # the loaded model, without the memo of its vectors
    assert reference._cache_key(sample[0]) == cache_key("embedding", "all-MiniLM-L6-v2", sample[0])  # old caches stay valid
    assert reference._cache_key(sample[0]) != first._cache_key(sample[0])
    served = reference.embed_texts(sample)
    assert reference.stats.misses == reference.encoded_texts == len(sample)  # computed, not read from int8 rows
    assert np.allclose(served, torch_vectors[:10], atol=1e-5) and not np.allclose(served, int8, atol=1e-3)
    second = HistoryEmbedder(cache=cache, backend="onnx-int8")
    assert np.array_equal(second.embed_texts(sample), int8)
    assert second.encoded_texts == 0 and second.stats.hits == len(sample)
    cache.close()


def test_torch_stays_selectable_and_onnx_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HistoryEmbedder().backend == "onnx-int8"
    assert HistoryEmbedder(backend="torch").backend == "torch"
    assert load_config(None, {"embedder": "torch"}).embedder == "torch"
    with pytest.raises(ConfigError, match="embedder"):
        load_config(None, {"embedder": "onnx-fp16"})
    monkeypatch.setattr(embedder_module, "onnx_available", lambda: False)
    assert HistoryEmbedder().backend == "torch"
    with pytest.raises(ConfigError, match="onnxruntime"):
        HistoryEmbedder(backend="onnx-int8")


def test_the_model_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("APM_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert onnx_encoder.model_cache_dir() == tmp_path / "apm-bench" / "models"
    monkeypatch.setenv("APM_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert onnx_encoder.model_cache_dir() == tmp_path / "elsewhere"


def test_prefetched_vectors_are_encoded_once_and_reach_the_cache(exporting: OnnxEncoder, model_dir: Path, texts: list[str],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APM_MODEL_CACHE", str(model_dir))
    cache = CallCache(tmp_path / "calls.sqlite")
    wanted = texts[:30]
    expected = exporting.encode(wanted)  # one call over the same texts: the same batches
    embedder = HistoryEmbedder(cache=cache, backend="onnx-int8")
    embedder.prefetch(wanted + wanted[:5])
    assert np.array_equal(embedder.embed_texts(wanted[:20]), expected[:20])
    assert embedder.encoded_texts == 30 and embedder.stats.misses == 20  # all 30 encoded once, 20 stored
    assert np.array_equal(embedder.embed_texts(wanted[20:]), expected[20:])
    assert embedder.encoded_texts == 30 and embedder.stats.misses == 30
    again = HistoryEmbedder(cache=cache, backend="onnx-int8")
    again.prefetch(wanted)  # everything is in the cache: read now, nothing encoded
    assert again._prefetch is None and again.stats.hits == 30
    assert np.array_equal(again.embed_texts(wanted), expected) and again.encoded_texts == 0
    cache.close()


def test_a_failed_prefetch_fails_where_the_vectors_are_wanted(model_dir: Path, texts: list[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APM_MODEL_CACHE", str(model_dir))
    embedder = HistoryEmbedder(backend="onnx-int8")

    def broken(batch: list[str]) -> np.ndarray:
        raise RuntimeError("the encoder broke")

    monkeypatch.setattr(embedder, "_encode_now", broken)
    embedder.prefetch(texts[:5])
    with pytest.raises(RuntimeError, match="the encoder broke"):
        embedder.embed_texts(texts[:2])
