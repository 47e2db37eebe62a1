"""Neutral prompts: the plain requests that a history writer rewrites to show a user's attributes.

The project ships its own set (`prompts/neutral.jsonl`); researchers can bring theirs as JSONL or
Parquet with at least a `text` column.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from apm_bench.errors import PromptFileError
from apm_bench.world.catalog import default_catalog_dir


class NeutralPrompt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    category: str = "uncategorized"
    text: str


def default_prompt_file() -> Path:
    return default_catalog_dir("prompts") / "neutral.jsonl"


def load_prompts(path: Path | None = None) -> list[NeutralPrompt]:
    """Load a JSONL or Parquet prompt file; rows without an id get one from their position."""
    path = Path(path) if path else default_prompt_file()
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    rows = _read_parquet_rows(path) if path.suffix == ".parquet" else _read_jsonl_rows(path)
    prompts: list[NeutralPrompt] = []
    for number, row in enumerate(rows, start=1):
        row.setdefault("id", f"{path.stem}-{number:05d}")
        try:
            prompt = NeutralPrompt.model_validate(row)
        except ValidationError as exc:
            raise PromptFileError(f"{path}: row {number} is not a prompt ({exc.errors()[0]['msg']})") from None
        if not prompt.text.strip():
            raise PromptFileError(f"{path}: row {number} has an empty text")
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise PromptFileError(f"{path}: prompt ids are not unique")
    return prompts


def read_jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; any unreadable line is a PromptFileError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PromptFileError(f"{path} is not UTF-8 text") from None
    objects = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}: line {number} must be a JSON object")
        objects.append((number, row))
    return objects


def _read_jsonl_rows(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl_objects(path)]


def _read_parquet_rows(path: Path) -> list[dict]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise PromptFileError(f"{path}: cannot read Parquet ({exc})") from None
    if "text" not in frame.columns:
        raise PromptFileError(f"{path}: a prompt Parquet file needs a 'text' column")
    frame = frame.astype({column: str for column in frame.columns if column in ("id", "category")})
    return frame.to_dict(orient="records")
