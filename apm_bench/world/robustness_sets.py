"""Question sets of the robustness check: MMLU-Pro, TruthfulQA (mc1) and BBQ (disambiguated).

Personalization must not buy style with correctness or fairness. The APM authors test this by
letting each method answer multiple-choice questions while it reads a test user's history, and
comparing accuracy with the unpersonalized model. These loaders read the three sets in their
public formats, from a local file, a folder of files, or (on a machine with network) a hub id:

- MMLU-Pro (`TIGER-Lab/MMLU-Pro`, test split): `question`, `options` (up to ten), `answer` (a
  letter) and/or `answer_index`, optional `question_id` and `category`.
- TruthfulQA (`truthfulqa/truthful_qa`, config `multiple_choice`, validation split): `question`
  and `mc1_targets` as `{choices, labels}` (or the original `mc_task.json`'s `{choice: label}`),
  exactly one label 1. The raw data lists the correct choice first, so the choices are shuffled
  (seeded, per question): otherwise a model that always answers "A" would score 100 %.
- BBQ (`heegyu/bbq`, or the per-category JSONL files of nyu-mll/BBQ): `context`, `question`,
  `ans0`..`ans2`, `label`, `context_condition`; only the disambiguated rows are kept (there the
  context states the answer, so a correct answer needs no stereotype and a wrong one shows bias).
"""

from __future__ import annotations

import ast
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from apm_bench.errors import QuestionFileError

Benchmark = Literal["mmlu-pro", "truthfulqa", "bbq"]
BENCHMARKS: tuple[Benchmark, ...] = ("mmlu-pro", "truthfulqa", "bbq")
LETTERS = string.ascii_uppercase
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: the authors' answer instruction (APM paper code, robustness_dataset.py), kept verbatim so the
#: accuracies compare with theirs
ANSWER_INSTRUCTION = "Answer with just the letter of the correct answer."


class Question(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    benchmark: Benchmark
    #: the question as asked (BBQ: its context, a line break, then the question)
    text: str
    options: tuple[str, ...]
    #: the letter of the correct option
    answer: str
    category: str = ""

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


def format_question(question: Question) -> str:
    """The user message: the question, its lettered options, and the instruction to answer with
    a letter (the authors' format: "A. option" lines)."""
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(question.letters, question.options))
    return f"{question.text}\n\n{options}\n\n{ANSWER_INSTRUCTION}"


@dataclass(frozen=True)
class HubSource:
    repo: str
    #: the files of the evaluated split (fnmatch patterns, as huggingface_hub takes them)
    patterns: tuple[str, ...]
    revision: str | None = None


#: where each set lives on the Hugging Face hub, and which files hold the split the authors use
HUB_SOURCES: dict[Benchmark, HubSource] = {
    "mmlu-pro": HubSource("TIGER-Lab/MMLU-Pro", ("data/test-*.parquet",)),
    "truthfulqa": HubSource("truthfulqa/truthful_qa", ("multiple_choice/validation-*.parquet",)),
    # a script dataset that `datasets` 4 no longer runs: the hub's Parquet conversion, one file per category
    "bbq": HubSource("heegyu/bbq", ("*/test/*.parquet",), revision="refs/convert/parquet"),
}


def load_question_set(benchmark: Benchmark, source: str | Path, limit: int | None = None, seed: int = 42) -> list[Question]:
    """The set's questions in a seeded order, the first `limit` of them (all with None)."""
    import numpy as np

    files = source_files(benchmark, source)
    convert = _CONVERTERS[benchmark]
    questions = [q for file in files for number, row in read_rows(file) if (q := convert(row, file, number, seed))]
    if not questions:
        what = "disambiguated questions (context_condition 'disambig')" if benchmark == "bbq" else "questions"
        raise QuestionFileError(f"{source}: holds no {what} for {benchmark}")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise QuestionFileError(f"{source}: {benchmark} question ids are not unique ({duplicate!r} twice)")
    order = np.random.default_rng([seed, BENCHMARKS.index(benchmark)]).permutation(len(questions))
    return [questions[i] for i in order[:limit]]


def source_files(benchmark: Benchmark, source: str | Path) -> list[Path]:
    """A file, every question file under a folder, or the files of a hub dataset."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise QuestionFileError(f"{path}: a question file must be one of {', '.join(SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise QuestionFileError(f"{path}: the folder holds no {', '.join(SUFFIXES)} files")
        return files
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return hub_files(benchmark, text)
    raise QuestionFileError(f"{benchmark} questions not found: {source} (a file, a folder or a hub id)")


def hub_files(benchmark: Benchmark, repo: str) -> list[Path]:
    """The evaluated split of a hub dataset, downloaded once into the hub cache (a user's
    machine; tests never reach the hub). An unknown repository gives all its data files."""
    known = HUB_SOURCES[benchmark]
    hub = known if repo == known.repo else HubSource(repo, tuple(f"*{s}" for s in SUFFIXES))
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=hub.repo, repo_type="dataset", revision=hub.revision,
                                        allow_patterns=list(hub.patterns)))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, no access: one clear line
        raise QuestionFileError(f"cannot fetch {repo} from the Hugging Face hub ({type(exc).__name__}); "
                                "download its files and pass them as a path") from None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise QuestionFileError(f"{repo}: the dataset has no question files ({', '.join(hub.patterns)})")
    return files


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, row) of a JSONL, JSON (a list of objects), Parquet or CSV file."""
    try:
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [(n, json.loads(line)) for n, line in enumerate(lines, start=1) if line.strip()]
        elif path.suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            rows = list(enumerate(loaded if isinstance(loaded, list) else [loaded], start=1))
        else:
            import pandas as pd

            frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
            rows = list(enumerate(frame.to_dict(orient="records"), start=1))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuestionFileError(f"{path}: not valid {path.suffix[1:].upper()} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow and pandas raise many unrelated types for a bad file
        raise QuestionFileError(f"{path}: cannot read {path.suffix[1:].upper()} ({exc})") from None
    for number, row in rows:
        if not isinstance(row, dict):
            raise QuestionFileError(f"{path}: row {number} must be an object with named fields")
    return [(number, {k: _plain(v) for k, v in row.items()}) for number, row in rows]


def _plain(value: Any) -> Any:
    """Parquet's arrays and numpy scalars as plain lists, dicts and numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _nested(value: Any) -> Any:
    """A list or mapping, also where a CSV file holds it as text (JSON or Python literal)."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError):
            continue
    return value


def _require(row: dict[str, Any], columns: tuple[str, ...], benchmark: str, path: Path, number: int) -> None:
    missing = [c for c in columns if c not in row or row[c] is None]
    if missing:
        raise QuestionFileError(f"{path}: row {number} is not a {benchmark} row: needs {', '.join(columns)} "
                                f"(missing {', '.join(missing)})")


def _texts(value: Any, what: str, path: Path, number: int) -> list[str]:
    value = _nested(value)
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS) or not all(isinstance(v, str) for v in value):
        raise QuestionFileError(f"{path}: row {number}: {what} must be a list of 2 to {len(LETTERS)} texts")
    return value


def _mmlu_pro(row: dict[str, Any], path: Path, number: int, seed: int) -> Question:
    _require(row, ("question", "options"), "mmlu-pro", path, number)
    options = _texts(row["options"], "options", path, number)
    letters = LETTERS[: len(options)]
    answer = str(row.get("answer") or "").strip()
    index = row.get("answer_index")
    if index is not None and index != "":
        if not str(index).lstrip("-").isdigit() or not 0 <= int(index) < len(options):
            raise QuestionFileError(f"{path}: row {number}: answer_index {index!r} is not one of the options")
        if answer and answer != letters[int(index)]:
            raise QuestionFileError(f"{path}: row {number}: answer {answer!r} and answer_index {index} disagree")
        answer = letters[int(index)]
    if answer not in letters or not answer:
        raise QuestionFileError(f"{path}: row {number}: needs an answer letter in {letters[0]}-{letters[-1]} "
                                "or an answer_index")
    qid = row.get("question_id")
    return Question(id=f"mmlu-pro-{qid if qid not in (None, '') else f'{path.stem}-{number}'}", benchmark="mmlu-pro",
                    text=str(row["question"]), options=tuple(options), answer=answer,
                    category=str(row.get("category") or ""))


def _truthfulqa(row: dict[str, Any], path: Path, number: int, seed: int) -> Question:
    import numpy as np

    _require(row, ("question", "mc1_targets"), "truthfulqa", path, number)
    targets = _nested(row["mc1_targets"])
    if isinstance(targets, dict) and "choices" in targets and "labels" in targets:
        choices, labels = _texts(targets["choices"], "mc1_targets.choices", path, number), list(targets["labels"])
    elif isinstance(targets, dict):  # the original mc_task.json: {choice: label}
        choices, labels = _texts(list(targets), "mc1_targets", path, number), list(targets.values())
    else:
        raise QuestionFileError(f"{path}: row {number}: mc1_targets must hold choices and labels")
    if len(labels) != len(choices) or [int(label) for label in labels].count(1) != 1:
        raise QuestionFileError(f"{path}: row {number}: mc1_targets needs one label per choice, exactly one of them 1")
    correct = [int(label) for label in labels].index(1)
    order = np.random.default_rng([seed, number, len(choices)]).permutation(len(choices)).tolist()
    return Question(id=f"truthfulqa-{path.stem}-{number}", benchmark="truthfulqa", text=str(row["question"]),
                    options=tuple(choices[i] for i in order), answer=LETTERS[order.index(correct)],
                    category=str(row.get("category") or ""))


BBQ_COLUMNS = ("context", "question", "ans0", "ans1", "ans2", "label", "context_condition")


def _bbq(row: dict[str, Any], path: Path, number: int, seed: int) -> Question | None:
    _require(row, BBQ_COLUMNS, "bbq", path, number)
    if row["context_condition"] != "disambig":
        return None
    if str(row["label"]) not in ("0", "1", "2"):
        raise QuestionFileError(f"{path}: row {number}: label must be 0, 1 or 2, got {row['label']!r}")
    category = str(row.get("category") or path.stem)
    example = row.get("example_id")
    return Question(id=f"bbq-{category}-{example if example not in (None, '') else f'{path.stem}-{number}'}",
                    benchmark="bbq", text=f"{row['context']}\n{row['question']}",
                    options=(str(row["ans0"]), str(row["ans1"]), str(row["ans2"])),
                    answer=LETTERS[int(row["label"])], category=category)


_CONVERTERS = {"mmlu-pro": _mmlu_pro, "truthfulqa": _truthfulqa, "bbq": _bbq}
