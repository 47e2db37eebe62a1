"""Learning curves (`apm curve`) and the training-set cap (`train_users`) they vary.

One tiny curve runs in process (two points on 120 simulated users, one world) and is shared by the
tests that read its files; the CLI's error paths run through its entry point and must stop before any run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from test_cli import apm_inline, describe

from apm_bench.errors import ConfigError, UnknownNameError
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.reporting.curve import CurveRecord, parse_values, plan_curve, run_curve
from apm_bench.reporting.report import geometric
from apm_bench.reporting.results import RunRecord
from apm_bench.run.config import RunConfig, load_config
from apm_bench.run.setup import build_worlds, prepare
from apm_bench.world.users import stratum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VALUES = [1, 4]


@pytest.fixture(scope="module")
def tiny_curve(embedder: HistoryEmbedder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CurveRecord]:
    work = tmp_path_factory.mktemp("curve")
    base = RunConfig(methods=["routing"], users=120, worlds=[0], bootstrap_resamples=200,
                     cache=work / "calls.sqlite", out=work / "curves")
    return run_curve(base, "history_len", VALUES, embedder=embedder)


def _runs(record: CurveRecord, folder: Path) -> dict[int, Path]:
    return {run.value: folder / "runs" / run.run_id for run in record.runs}


def test_curve_folder_holds_json_csv_png_and_one_run_per_value(tiny_curve: tuple[Path, CurveRecord]) -> None:
    folder, record = tiny_curve
    assert folder.name == record.curve_id and "history_len" in folder.name
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    on_disk = CurveRecord.model_validate_json((folder / "curve.json").read_text(encoding="utf-8"))
    assert on_disk == record
    assert record.field == "history_len" and record.values == VALUES
    assert [run.value for run in record.runs] == VALUES
    assert sorted(p.name for p in (folder / "runs").iterdir()) == sorted(run.run_id for run in record.runs)
    for value, run in _runs(record, folder).items():
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        assert config["history_len"] == value and config["drawn_history_len"] == max(VALUES)
    # every method but the baseline (Δ = 0 by definition) at every value, once
    assert set(record.methods) == {"oracle", "prior", "routing"}
    assert Counter((p.method, p.value) for p in record.points) == {(m, v): 1 for m in record.methods for v in VALUES}
    csv = pd.read_csv(folder / "curve.csv")
    assert list(csv.columns[:2]) == ["history_len", "method"] and len(csv) == len(record.points)
    assert (folder / "curve.png").read_bytes().startswith(PNG_MAGIC)


def test_each_point_is_its_run_pooled_row(tiny_curve: tuple[Path, CurveRecord]) -> None:
    folder, record = tiny_curve
    for value, run in _runs(record, folder).items():
        metrics = RunRecord.model_validate_json((run / "metrics.json").read_text(encoding="utf-8"))
        pooled = {m.method: m for m in metrics.metrics if m.world == "pooled"}
        for point in (p for p in record.points if p.value == value):
            row = pooled[point.method]
            assert (point.delta, point.ci_low, point.ci_high, point.n_users) == (row.delta, row.ci_low, row.ci_high, row.n_users)
            assert point.ci_low <= point.delta <= point.ci_high


def test_history_points_differ_in_history_length_only(tiny_curve: tuple[Path, CurveRecord]) -> None:
    """Shorter histories are cut from the same users' longer ones: the same test users and prompts,
    hence the same baseline and oracle responses; only what methods read grows."""
    folder, record = tiny_curve
    short, long = (pd.read_parquet(_runs(record, folder)[v] / "samples.parquet") for v in VALUES)
    key = ["world", "user_id", "method"]
    short, long = short.sort_values(key).reset_index(drop=True), long.sort_values(key).reset_index(drop=True)
    assert short[key].equals(long[key]) and short["prompt"].equals(long["prompt"])
    for method in ("baseline", "oracle"):
        assert short.loc[short["method"] == method, "response"].tolist() == long.loc[long["method"] == method, "response"].tolist()
    assert (short["history_tokens"] < long["history_tokens"]).mean() > 0.9
    oracle = {p.value: p.delta for p in record.points if p.method == "oracle"}
    assert oracle[1] == oracle[4]


# --------------------------------------------------------------------------- train_users


def test_train_users_keeps_nested_balanced_subsets_and_the_same_test_users() -> None:
    catalog, population = prepare(RunConfig(users=200, worlds=[0, 1]))
    worlds = {n: build_worlds(RunConfig(users=200, worlds=[0, 1], train_users=n), catalog, population) for n in (None, 50, 100)}
    attributes = {u.id: u.attributes for u in population.users}
    for index in (0, 1):
        full, fifty, hundred = (worlds[n][index].split for n in (None, 50, 100))
        assert (len(fifty.train), len(hundred.train)) == (50, 100)
        assert set(fifty.train) < set(hundred.train) < set(full.train)
        assert fifty.test == hundred.test == full.test and fifty.validation == hundred.validation == full.validation
        # a capped set mixes the users' (attribute, side) cells as the whole training set does
        whole = Counter(stratum(attributes[u]) for u in full.train)
        kept = Counter(stratum(attributes[u]) for u in fifty.train)
        assert all(abs(kept[key] - 50 * count / len(full.train)) <= 1 for key, count in whole.items())
    assert worlds[50][0].split.train != worlds[50][1].split.train  # each world caps its own split


def test_train_users_must_be_positive_and_fit_the_training_set() -> None:
    with pytest.raises(ConfigError, match="train_users"):
        load_config(None, {"train_users": 0})
    config = RunConfig(users=200, worlds=[0], train_users=500)
    with pytest.raises(ConfigError, match="train_users 500 exceeds the 130 training users"):
        prepare(config)


def test_parse_values_and_log_axis() -> None:
    assert parse_values("1, 2,4,8") == [1, 2, 4, 8]
    for bad in ("1,x", "3", "2,2", "1,,2"):
        with pytest.raises(ConfigError):
            parse_values(bad)
    assert geometric([1, 2, 4, 8]) and geometric([500, 1000, 2000, 4000])
    assert not geometric([1, 4]) and not geometric([1, 2, 3, 4]) and not geometric([0, 1, 2])


# --------------------------------------------------------------------------- the command line

def test_plan_curve_checks_the_field_and_every_value(tmp_path: Path) -> None:
    base = RunConfig(users=200)
    plans = plan_curve(base, "users", [100, 200], tmp_path)
    assert [(label, c.users, c.out) for label, c in plans] == [("users=100", 100, tmp_path), ("users=200", 200, tmp_path)]
    assert all(c.drawn_history_len is None for _, c in plans)  # only a history curve draws the longest history
    with pytest.raises(UnknownNameError, match="unknown curve field 'temperature'.*train_users"):
        plan_curve(base, "temperature", [0, 1], tmp_path)
    with pytest.raises(ConfigError, match="--vary users 5: invalid run option users"):
        plan_curve(base, "users", [200, 5], tmp_path)
    with pytest.raises(ConfigError, match="drawn_history_len 4 is shorter than history_len 8"):
        plan_curve(base.model_copy(update={"drawn_history_len": 4}), "history_len", [1, 8], tmp_path)


CLI_ERRORS = [
    pytest.param(["curve", "--vary", "histroy_len", "1,2"], ["did you mean 'history_len'"], id="unknown-field"),
    pytest.param(["curve", "--vary", "history_len", "1,two"], ["whole numbers", "'1,two'"], id="bad-values"),
    pytest.param(["curve", "--history-len", "2", "--vary", "history_len", "1,4"], ["drop --history-len"], id="field-set-twice"),
    pytest.param(["curve", "--vary", "train_users", "50,1000"], ["train_users 1000 exceeds"], id="train-users-too-many"),
    pytest.param(["run", "--train-users", "1000"], ["train_users 1000 exceeds"], id="run-train-users-too-many"),
]


@pytest.mark.parametrize(("args", "expected"), CLI_ERRORS)
def test_bad_curve_input_is_one_error_line_before_any_run(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    cache = tmp_path / "calls.sqlite"
    proc = apm_inline(*args, "--users", "200", "--method", "routing", "--out", tmp_path / "out", "--cache", cache, cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    for fragment in expected:
        assert fragment.lower() in lines[0].lower(), describe(proc)
    assert not (tmp_path / "out").exists() and not cache.exists()  # no run folder, no engine ever opened the cache
