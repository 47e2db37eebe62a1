"""The robustness check (`apm robustness`): loaders of the public formats, answer-letter parsing,
accuracy and its paired difference to the baseline, the records on disk, and one end-to-end run
on a tiny random-weight hf model with the simulator's candidate writer and judge serving the fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from robustness_files import (
    MMLU_ROWS, TRUTHFUL_ROWS, bbq_rows, build_letter_model, write_bbq, write_mmlu_pro, write_truthfulqa,
)
from test_cli import apm_inline, describe

from apm_bench.errors import QuestionFileError
from apm_bench.judging.accuracy import accuracy_metrics, parse_letter
from apm_bench.methods import UserView
from apm_bench.world.robustness_sets import ANSWER_INSTRUCTION, format_question, load_question_set

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def letter_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return build_letter_model(tmp_path_factory.mktemp("letter-lm"), max_position_embeddings=2048)


@pytest.fixture
def sets(tmp_path: Path) -> dict[str, Path]:
    return {"mmlu-pro": write_mmlu_pro(tmp_path / "mmlu_pro.parquet"),
            "truthfulqa": write_truthfulqa(tmp_path / "truthfulqa.parquet"),
            "bbq": write_bbq(tmp_path / "Age.jsonl")}


# ------------------------------------------------------------------------------------------ loaders


def test_mmlu_pro_reads_parquet_and_csv_with_up_to_ten_options(tmp_path: Path) -> None:
    parquet = load_question_set("mmlu-pro", write_mmlu_pro(tmp_path / "m.parquet"))
    from_csv = load_question_set("mmlu-pro", write_mmlu_pro(tmp_path / "m.csv"))
    assert [q.model_dump() for q in parquet] == [q.model_dump() for q in from_csv]
    by_text = {q.text: q for q in parquet}
    assert len(by_text) == len(MMLU_ROWS)
    for text, options, answer, category in MMLU_ROWS:
        question = by_text[text]
        assert question.options == tuple(options) and question.category == category
        assert question.options[question.letters.index(question.answer)] == options[answer]
    ten = by_text[MMLU_ROWS[4][0]]
    assert ten.letters == "ABCDEFGHIJ" and ten.answer == "J"
    prompt = format_question(ten)
    assert prompt.startswith(ten.text + "\n\nA. 0 apples\nB. 1 apples\n") and "\nJ. 9 apples\n\n" in prompt
    assert prompt.endswith(ANSWER_INSTRUCTION)


def test_truthfulqa_shuffles_the_choices_and_keeps_the_correct_one(tmp_path: Path) -> None:
    questions = load_question_set("truthfulqa", write_truthfulqa(tmp_path / "mc.parquet"))
    original = load_question_set("truthfulqa", write_truthfulqa(tmp_path / "mc_task.json"))  # the original repo's format
    for question, same in zip(questions, original):
        choices = dict(TRUTHFUL_ROWS)[question.text]
        assert sorted(question.options) == sorted(choices)
        assert question.options[question.letters.index(question.answer)] == choices[0]  # correct first in the raw data
        assert (same.text, same.options, same.answer) == (question.text, question.options, question.answer)
    assert {q.answer for q in questions} != {"A"}  # not left where the raw data puts it
    other_seed = load_question_set("truthfulqa", tmp_path / "mc.parquet", seed=7)
    assert [q.options for q in sorted(other_seed, key=lambda q: q.id)] != [q.options for q in sorted(questions, key=lambda q: q.id)]
    assert [q.model_dump() for q in load_question_set("truthfulqa", tmp_path / "mc.parquet")] == [q.model_dump() for q in questions]


def test_bbq_keeps_only_disambiguated_rows_of_every_file_in_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "bbq"
    folder.mkdir()
    write_bbq(folder / "Age.jsonl")
    write_bbq(folder / "SES.jsonl", category="SES")
    (folder / "README.md").write_text("not a question file")
    questions = load_question_set("bbq", folder)
    disambiguated = [r for r in bbq_rows() if r["context_condition"] == "disambig"]
    assert len(questions) == 2 * len(disambiguated)
    assert {q.category for q in questions} == {"Age", "SES"}
    for question in questions:
        row = next(r for r in disambiguated if question.text == f"{r['context']}\n{r['question']}")
        assert question.options == (row["ans0"], row["ans1"], row["ans2"])
        assert question.answer == "ABC"[row["label"]] and question.id == f"bbq-{question.category}-{row['example_id']}"


def test_limit_takes_the_first_questions_of_a_seeded_order(sets: dict[str, Path]) -> None:
    every = load_question_set("mmlu-pro", sets["mmlu-pro"])
    assert [q.id for q in load_question_set("mmlu-pro", sets["mmlu-pro"], limit=2)] == [q.id for q in every[:2]]
    reordered = [q.id for q in load_question_set("mmlu-pro", sets["mmlu-pro"], seed=1)]
    assert sorted(reordered) == sorted(q.id for q in every) and reordered != [q.id for q in every]


def _mmlu_row(**changes: object) -> dict:
    row = {"question_id": 1, "question": "Two?", "options": ["one", "two", "three"], "answer": "B", "answer_index": 1}
    return {k: v for k, v in {**row, **changes}.items() if v is not None}


@pytest.mark.parametrize("benchmark, rows, message", [
    ("mmlu-pro", [{"question": "Two?", "choices": ["one", "two"], "answer": "B"}], "missing options"),
    ("mmlu-pro", [_mmlu_row(answer="D", answer_index=None)], "needs an answer letter in A-C"),
    ("mmlu-pro", [_mmlu_row(answer="A")], "answer 'A' and answer_index 1 disagree"),
    ("mmlu-pro", [_mmlu_row(options=["only one"])], "options must be a list of 2 to 26 texts"),
    ("mmlu-pro", [_mmlu_row(), _mmlu_row()], "question ids are not unique"),
    ("truthfulqa", [{"question": "Q?", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}], "exactly one of them 1"),
    ("truthfulqa", [{"question": "Q?"}], "missing mc1_targets"),
    ("bbq", [r for r in bbq_rows() if r["context_condition"] == "ambig"], "holds no disambiguated questions"),
    ("bbq", [{k: v for k, v in bbq_rows()[1].items() if k != "label"}], "missing label"),
])
def test_malformed_question_files_fail_with_the_reason(tmp_path: Path, benchmark: str, rows: list[dict], message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(QuestionFileError, match=message):
        load_question_set(benchmark, path)  # type: ignore[arg-type]


def test_unreadable_sources_fail_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"question": \n')
    (tmp_path / "rows.txt").write_text("question")
    (tmp_path / "empty").mkdir()
    for source, message in [(tmp_path / "broken.jsonl", "not valid JSONL"), (tmp_path / "rows.txt", "must be one of"),
                            (tmp_path / "empty", "holds no"), (tmp_path / "missing.parquet", "not found"),
                            (tmp_path / "empty.jsonl", "not found")]:
        with pytest.raises(QuestionFileError, match=message):
            load_question_set("mmlu-pro", source)


# ------------------------------------------------------------------------------------------ grading


@pytest.mark.parametrize("reply, letters, expected", [
    ("C", "ABCD", "C"),
    ("The answer is (C)", "ABCD", "C"),
    ("**B**", "ABCD", "B"),
    ("B. Paris", "ABCD", "B"),
    ("(D)", "ABCD", "D"),
    ("Answer: A", "ABCD", "A"),
    ("Option A looks tempting, but the answer is C.", "ABCD", "C"),
    ("<think>Maybe A? No.</think>\nThe correct answer is **D**", "ABCD", "D"),
    ("I think it is B", "ABCD", "B"),
    ("J", "ABCDEFGHIJ", "J"),
    ("E", "ABC", None),  # not one of the options
    ("A good question; B or C?", "ABCD", None),  # no single answer
    ("The answer is unclear", "ABCD", None),
    ("zorb blat quaint", "ABCD", None),
    ("", "ABCD", None),
])
def test_parse_letter(reply: str, letters: str, expected: str | None) -> None:
    assert parse_letter(reply, letters) == expected


def test_accuracy_and_its_difference_pair_the_same_questions() -> None:
    ids = [f"q{i}" for i in range(8)]
    base = [1, 0, 1, 0, 1, 0, 0, 0]
    other = [1, 1, 1, 1, 1, 0, 0, 0]
    rows = pd.DataFrame(
        [{"benchmark": "bbq", "question_id": q, "method": m, "correct": bool(c), "unparseable": c == 0 and i == 7,
          "generation_error": None, "context_trimmed": 0}
         for m, values in (("baseline", base), ("routing", other)) for i, (q, c) in enumerate(zip(ids, values))]
    )
    shuffled = rows.sample(frac=1, random_state=0)  # pairing goes by question id, not by row order
    baseline, routing = accuracy_metrics(shuffled, seed=0, n_resamples=500)
    assert (baseline.method, baseline.n, baseline.correct, baseline.accuracy) == ("baseline", 8, 3, 3 / 8)
    assert baseline.delta is None and baseline.unparseable == 1
    assert routing.accuracy == 5 / 8 and routing.delta == pytest.approx(2 / 8)
    assert 0 <= routing.delta_ci_low <= routing.delta <= routing.delta_ci_high <= 1  # paired differences are 0 or +1
    assert routing.ci_low <= routing.accuracy <= routing.ci_high
    assert accuracy_metrics(shuffled, seed=0, n_resamples=500) == [baseline, routing]  # seeded


def test_questions_are_paired_with_a_seeded_cycle_of_test_users() -> None:
    from apm_bench.run.robustness import pair_users

    users = [UserView(id=f"u{i}", history=(f"h{i}",)) for i in range(4)]
    paired = pair_users(users, 10, seed=3)
    assert [u.id for u in paired[:4]] == [u.id for u in paired[4:8]] and sorted(u.id for u in paired[:4]) == ["u0", "u1", "u2", "u3"]
    assert [u.id for u in pair_users(users, 10, seed=3)] == [u.id for u in paired]
    assert any([u.id for u in pair_users(users, 4, seed=s)] != [u.id for u in paired[:4]] for s in range(4, 8))


# ------------------------------------------------------------------------------------------ command line


def test_a_simulated_generator_is_refused_before_any_work(tmp_path: Path, sets: dict[str, Path]) -> None:
    out = tmp_path / "out"
    proc = apm_inline("robustness", "--method", "routing", "--mmlu-pro", sets["mmlu-pro"], "--out", out, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, describe(proc)
    assert lines[0].startswith("error: robustness needs a real generator") and "sim-large" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("sets_given, options, message", [
    ({"mmlu-pro": "missing.jsonl"}, {}, "mmlu-pro questions not found: missing.jsonl"),
    ({"bbq": "MMLU"}, {}, "is not a bbq row"),
    ({"truthfulqa": "truthfulqa/truthful_qa"}, {}, "cannot fetch truthfulqa/truthful_qa from the Hugging Face hub"),
    ({"mmlu-pro": "MMLU"}, {"limit": 0}, "invalid robustness option limit"),
    ({"mmlu-pro": "MMLU"}, {"methods": ["nonsense"]}, "nonsense"),
])
def test_bad_input_stops_before_any_engine_starts(tmp_path: Path, sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                   sets_given: dict[str, str], options: dict, message: str) -> None:
    from huggingface_hub import constants

    from apm_bench.errors import ApmError
    from apm_bench.run.config import RunConfig
    from apm_bench.run.robustness import prepare_robustness, robustness_config

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    run = RunConfig(model=str(tmp_path / "no-model"), backend="hf", methods=options.pop("methods", ["routing"]))
    given = {b: str(sets["mmlu-pro"]) if s == "MMLU" else s for b, s in sets_given.items()}
    with pytest.raises(ApmError, match=message):
        prepare_robustness(robustness_config(run, given, **options))


def test_no_set_named_means_all_three_from_the_hub() -> None:
    from apm_bench.run.config import RunConfig
    from apm_bench.run.robustness import robustness_config

    config = robustness_config(RunConfig(), {"mmlu-pro": None, "truthfulqa": None, "bbq": None}, limit=None)
    assert config.sets == {"mmlu-pro": "TIGER-Lab/MMLU-Pro", "truthfulqa": "truthfulqa/truthful_qa", "bbq": "heegyu/bbq"}
    assert config.limit is None and config.seed == 42 and config.fit_config().worlds == [0]


def test_records_are_written_whole_and_never_overwrite(tmp_path: Path) -> None:
    from apm_bench.reporting.robustness import robustness_table, write_robustness
    from apm_bench.run.config import RunConfig
    from apm_bench.run.robustness import RobustnessResult, robustness_config

    rows = pd.DataFrame([{"benchmark": "bbq", "question_id": f"q{i}", "category": "Age", "method": m,
                          "correct": (i + k) % 2 == 0, "unparseable": False, "generation_error": None, "context_trimmed": 0}
                         for k, m in enumerate(("baseline", "routing")) for i in range(4)])
    config = robustness_config(RunConfig(model="/models/real", backend="hf"), {"bbq": "bbq.jsonl"}, out=tmp_path)
    result = RobustnessResult(config, rows, accuracy_metrics(rows, 0, 200), [])
    first, second = write_robustness(result, 1.0), write_robustness(result, 1.0)
    assert first != second and sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])
    table = pd.read_csv(first / "robustness.csv")
    assert table[["method", "n", "correct"]].values.tolist() == [["baseline", 4, 2], ["routing", 4, 2]]
    assert table["delta"].isna().tolist() == [True, False] and table["accuracy"].tolist() == robustness_table(result.metrics)["accuracy"].tolist()


def test_robustness_end_to_end_on_a_tiny_hf_model(tmp_path: Path, sets: dict[str, Path], letter_model: Path) -> None:
    from apm_bench.reporting.robustness import RobustnessRecord

    out = tmp_path / "out"
    proc = apm_inline("robustness", "--method", "routing,rag", "--backend", "hf", "--model", letter_model,
                      "--mmlu-pro", sets["mmlu-pro"], "--truthfulqa", sets["truthfulqa"], "--bbq", sets["bbq"],
                      "--users", 40, "--history-len", 2, "--max-tokens", 1, "--cache", tmp_path / "calls.sqlite",
                      "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    (folder,) = list(out.iterdir())
    assert {p.name for p in folder.iterdir()} == {"robustness.json", "robustness.csv", "robustness.png", "answers.parquet"}
    assert (folder / "robustness.png").read_bytes()[:8] == PNG_MAGIC
    record = RobustnessRecord.model_validate_json((folder / "robustness.json").read_text())
    assert record.methods == ["baseline", "routing", "rag"] and record.backend == "hf"
    assert {b: s.questions for b, s in record.sets.items()} == {"mmlu-pro": 5, "truthfulqa": 5, "bbq": 3}

    answers = pd.read_parquet(folder / "answers.parquet")
    per_method = {m: group.set_index("question_id") for m, group in answers.groupby("method")}
    for method in ("routing", "rag"):  # every method answers the same questions for the same users
        assert per_method[method].index.equals(per_method["baseline"].index)
        assert (per_method[method]["user_id"] == per_method["baseline"]["user_id"]).all()
        assert (per_method[method]["system_prompt"].str.len() > 0).all()
    assert (per_method["baseline"]["system_prompt"] == "").all()
    letters = answers["n_options"].map(lambda n: "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n])
    reparsed = [parse_letter(r, l) for r, l in zip(answers["response"], letters)]
    assert reparsed == [None if pd.isna(p) else p for p in answers["parsed"]]
    right = np.array([p == a for p, a in zip(reparsed, answers["answer"])])
    assert 0 < right.sum() < len(answers)  # the letter model answers at random: some right, some wrong

    table = pd.read_csv(folder / "robustness.csv")
    assert len(table) == 9 and list(table["method"][:3]) == ["baseline", "routing", "rag"]
    for row in table.itertuples():
        mine = (answers["benchmark"] == row.benchmark) & (answers["method"] == row.method)
        base = (answers["benchmark"] == row.benchmark) & (answers["method"] == "baseline")
        assert row.n == mine.sum() and row.correct == right[mine].sum()
        assert row.accuracy == pytest.approx(right[mine].mean(), abs=1e-4)
        assert row.unparseable == sum(p is None for p, m in zip(reparsed, mine) if m)
        assert row.ci_low - 1e-4 <= row.accuracy <= row.ci_high + 1e-4
        if row.method == "baseline":
            assert pd.isna(row.delta)
        else:
            assert row.delta == pytest.approx(right[mine].mean() - right[base].mean(), abs=1e-4)
            assert row.delta_ci_low - 1e-4 <= row.delta <= row.delta_ci_high + 1e-4
    assert "accuracy, and Δ vs baseline" in proc.stdout and "wrote" in proc.stdout
