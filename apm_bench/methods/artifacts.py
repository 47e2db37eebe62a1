"""Trained weights (adapters, soft-prompt projectors) stored under a key of everything that
determines them, so a resumed or repeated run loads them instead of training again.

The store lives beside the call cache (`.apm-cache/artifacts/<key>/`); a finished run copies the
artifacts it used into its own folder (`results/runs/<id>/artifacts/`), where they are ready to
serve (PEFT adapter folders for vLLM's LoRARequest, safetensors soft prompts for its prompt
embeddings). A directory appears under its final name only once complete, so a crash during
training leaves nothing that could be mistaken for a finished artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.used: dict[str, Path] = {}

    def find(self, key: str) -> Path | None:
        """The finished artifact stored under `key`, recorded as used by this run; None if absent."""
        directory = self.root / key
        if directory.is_dir():
            self.used[key] = directory
            return directory
        return None

    @contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        """A fresh folder to write into; renamed to its key when the block ends without error."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        try:
            yield staging
            final = self.root / key
            try:
                os.rename(staging, final)
            except OSError:  # another process finished the same artifact first: keep theirs
                if not final.is_dir():
                    raise
                shutil.rmtree(staging, ignore_errors=True)
            self.used[key] = final
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def copy_used(self, destination: Path) -> list[str]:
        """Copy every artifact this run used into `destination`; returns their keys."""
        for key, source in sorted(self.used.items()):
            shutil.copytree(source, destination / key, dirs_exist_ok=True)
        return sorted(self.used)
