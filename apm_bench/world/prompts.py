"""Neutral prompts: the plain requests that a history writer rewrites to show a user's attributes.

The project ships its own set (`prompts/neutral.jsonl`); researchers can bring theirs as JSONL or
Parquet with a `text` column, or in UltraChat's format (`prompt_id` and `messages`, as in
HuggingFaceH4/ultrachat_200k, whose first user message is the prompt), which is what the APM
authors drew from: `train_sft` for training users, `test_sft` for test users.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from apm_bench.errors import PromptFileError
from apm_bench.world.catalog import default_catalog_dir


class NeutralPrompt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    category: str = "uncategorized"
    text: str


def from_ultrachat(row: dict) -> dict:
    """An UltraChat row as a prompt: its first user message, under its prompt_id; other rows as they are."""
    if "text" in row or not isinstance(row.get("messages"), (list, tuple)):
        return row
    first = next((m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None)
    converted = {"text": first if isinstance(first, str) else "", "category": "ultrachat"}
    if row.get("prompt_id") is not None:
        converted["id"] = str(row["prompt_id"])
    return converted


def split_prompt_pools(prompts: list[NeutralPrompt], test_share: float, minimum: int, seed: int) -> tuple[
        list[NeutralPrompt], list[NeutralPrompt]]:
    """(training pool, test pool): disjoint, the test pool `test_share` of the prompts (at least
    `minimum` each), so no test user's conversation is one a training user had."""
    import numpy as np

    order = np.random.default_rng([seed, 0x7E5]).permutation(len(prompts))
    n_test = max(minimum, round(len(prompts) * test_share))
    if n_test + minimum > len(prompts):
        raise PromptFileError(f"{len(prompts)} prompts cannot make two disjoint pools of at least {minimum} each")
    test = set(order[:n_test].tolist())
    return [p for i, p in enumerate(prompts) if i not in test], [p for i, p in enumerate(prompts) if i in test]


#: a dataset split on the Hugging Face hub, e.g. HuggingFaceH4/ultrachat_200k:test_sft
HUB_SPLIT = re.compile(r"[\w.-]+/[\w.-]+:[\w.-]+")


def hub_split_files(spec: str) -> list[Path]:
    """The Parquet files of one split of a hub dataset (downloaded once into the hub cache): for
    a user's machine; tests and the default run never reach the hub."""
    repo, _, split = spec.partition(":")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=repo, repo_type="dataset",
                                        allow_patterns=[f"data/{split}-*.parquet", f"{split}/*.parquet"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, no access: one clear line
        raise PromptFileError(f"cannot fetch {spec} from the Hugging Face hub ({type(exc).__name__}); "
                              "download its Parquet files and pass them as a path") from None
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise PromptFileError(f"{spec}: the dataset has no Parquet files for split {split!r}")
    return files


def default_prompt_file() -> Path:
    return default_catalog_dir("prompts") / "neutral.jsonl"


def load_prompts(path: Path | None = None) -> list[NeutralPrompt]:
    """Load a JSONL or Parquet prompt file; rows without an id get one from their position."""
    path = Path(path) if path else default_prompt_file()
    if not path.is_file() and HUB_SPLIT.fullmatch(str(path)):
        files = hub_split_files(str(path))
        rows = [row for file in files for row in _read_parquet_rows(file)]
    elif not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    else:
        rows = _read_parquet_rows(path) if path.suffix == ".parquet" else _read_jsonl_rows(path)
    prompts: list[NeutralPrompt] = []
    for number, row in enumerate(rows, start=1):
        row = from_ultrachat(row)
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
    texts = [" ".join(p.text.split()).lower() for p in prompts]
    if len(set(texts)) != len(texts):
        repeated = next(p.text for p, t in zip(prompts, texts) if texts.count(t) > 1)
        raise PromptFileError(f"{path}: {len(texts) - len(set(texts))} prompts repeat another's text "
                              f"(e.g. {repeated[:60]!r}); users would get the same request twice")
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
    if not {"text", "messages"} & set(frame.columns):
        raise PromptFileError(f"{path}: a prompt Parquet file needs a 'text' column (or UltraChat's 'messages')")
    frame = frame.astype({column: str for column in frame.columns if column in ("id", "category", "prompt_id")})
    rows = frame.to_dict(orient="records")
    for row in rows:  # Parquet lists arrive as arrays
        if "messages" in row and not isinstance(row["messages"], list) and row["messages"] is not None:
            row["messages"] = [dict(m) for m in row["messages"]]
    return rows
