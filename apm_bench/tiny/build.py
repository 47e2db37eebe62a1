"""`apm tiny-model build`: corpus → tokenizer → model → training → a model folder with a manifest.

The folder is a plain transformers checkpoint (fp16 safetensors, tokenizer, ChatML template), so
hf, vLLM and `vllm serve` load it like any hub model. Its `manifest.json` records how it was
built (every setting, the corpus by kind, the held-out prompts, times, the final loss) and a
checksum of its files; the copy shipped in the package is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from apm_bench.errors import ConfigError
from apm_bench.tiny.corpus import PLAIN, CorpusConfig, Example, held_out_prompts, kind_counts, read_corpus, record_corpus, write_corpus
from apm_bench.tiny.model import TinyShape, new_model, train_tokenizer
from apm_bench.tiny.training import TrainingConfig, TrainingLog, context_use, train

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

MANIFEST = "manifest.json"
#: the files a model folder's checksum covers (everything an engine reads)
CHECKSUMMED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, ge=0)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    shape: TinyShape = Field(default_factory=TinyShape)
    training: TrainingConfig = Field(default_factory=TrainingConfig)


#: the model folders the package ships, and the command that rebuilds each
SHIPPED = {"apm-tiny": "apm tiny-model build", "apm-tiny-judge": "apm tiny-model build-judge"}


def bundled_folder(name: str = "apm-tiny") -> Path:
    """Where the package keeps a shipped model, which its alias loads (the build's default target)."""
    from apm_bench.backends import bundled_path

    return bundled_path(name)


def checksum(folder: Path) -> str:
    """sha256 over the checksummed files that exist, by name, in a fixed order."""
    digest = hashlib.sha256()
    for name in CHECKSUMMED:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def verify(folder: Path) -> dict:
    """The folder's manifest, once its files are checked against the checksum it records."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{folder} holds no apm-tiny model ({MANIFEST} missing): run `apm tiny-model build`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    found = checksum(folder)
    if found != manifest["checksum"]:
        name = manifest.get("model", "apm-tiny")
        raise ConfigError(f"{name} in {folder} does not match its manifest (sha256 {found[:12]}…, "
                          f"recorded {manifest['checksum'][:12]}…): rebuild it with "
                          f"`{SHIPPED.get(name, SHIPPED['apm-tiny'])}`")
    return manifest


def build(config: BuildConfig, out: Path, corpus_file: Path | None = None,
          report: Callable[[str], None] = lambda line: None) -> dict:
    """Build apm-tiny into `out`; a corpus file, where given and present, is read instead of recorded."""
    times: dict[str, float] = {}
    started = time.perf_counter()
    if corpus_file is not None and corpus_file.is_file():
        examples = read_corpus(corpus_file)
        report(f"corpus: {len(examples)} examples read from {corpus_file}")
    else:
        report("corpus: recording the simulator's answers to the methods' requests")
        examples = record_corpus(config.corpus)
        if corpus_file is not None:
            write_corpus(examples, corpus_file)
    times["corpus_s"] = time.perf_counter() - started
    report(f"corpus: {len(examples)} examples {kind_counts(examples)}")

    mark = time.perf_counter()
    tokenizer = train_tokenizer(corpus_texts(examples), config.shape.vocab_size)
    times["tokenizer_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    model = new_model(tokenizer, config.shape, config.seed)
    probe = [e for e in examples if e.kind == PLAIN and e.messages[0][0] == "system"][:48]
    log = train(model, tokenizer, examples, config.training, report,
                check=lambda: "context (own / system swapped / user swapped) " + " / ".join(
                    f"{v:.3f}" for v in context_use(model, tokenizer, probe).values()))
    times["training_s"] = time.perf_counter() - mark

    _, held_out = held_out_prompts()
    return write_model_folder(model, tokenizer, out, {
        "model": "apm-tiny",
        "build": config.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"examples": len(examples), "by_kind": kind_counts(examples), "left_out_as_too_long": log.left_out},
        "held_out_prompts": [p.id for p in held_out],
        "context_use": context_use(model, tokenizer, probe),
        "training": training_summary(log),
    }, times, started)


def training_summary(log: TrainingLog) -> dict:
    import torch

    return {"steps": log.steps, "tokens": log.tokens, "final_loss": round(log.final_loss, 4),
            "tokens_per_s": round(log.tokens / max(log.seconds, 1e-9)), "threads": torch.get_num_threads()}


def write_model_folder(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, manifest: dict,
                       times: dict[str, float], started: float) -> dict:
    """Save fp16 weights and the tokenizer with a manifest (what was built, how long it took, its
    size and checksum); the folder appears whole or not at all."""
    import torch

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.float16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    manifest = {
        **manifest,
        "seconds": {**{k: round(v, 1) for k, v in times.items()}, "total_s": round(time.perf_counter() - started, 1)},
        "bytes": sum((partial / name).stat().st_size for name in CHECKSUMMED if (partial / name).is_file()),
        "checksum": checksum(partial),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _replace_folder(partial, out)
    return manifest


def _replace_folder(new: Path, old: Path) -> None:
    """Put the finished folder in place; an interrupted build leaves the previous model whole."""
    retired = old.with_name(old.name + ".previous")
    shutil.rmtree(retired, ignore_errors=True)
    if old.exists():
        old.rename(retired)
    new.rename(old)
    shutil.rmtree(retired, ignore_errors=True)


def corpus_texts(examples: list[Example]) -> Iterator[str]:
    """What the tokenizer learns its merges from: every context and answer of the corpus."""
    for example in examples:
        yield "\n".join(content for _, content in example.messages)
        yield example.answer
