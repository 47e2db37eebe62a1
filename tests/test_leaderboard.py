"""The suite and the leaderboard: deterministic files, a check that catches edited records, and
rows taken from the newest run of each method."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_cli import apm_inline

from apm_bench.errors import ApmError, ConfigError
from apm_bench.reporting.leaderboard import StaleLeaderboard, build, check, collect, length_controlled_delta
from apm_bench.reporting.suite import SuiteConfig, load_suite, plan_suite, run_suite

REPO = Path(__file__).resolve().parents[1]


def _pooled_deltas(setting: Path, control: str | None) -> dict[str, float]:
    """Pooled Δ per method of the one run of `setting` recorded under `control`."""
    folder = next(f.parent for f in setting.rglob("config.json") if json.loads(f.read_text())["control"] == control)
    record = json.loads((folder / "metrics.json").read_text())
    return {m["method"]: m["delta"] for m in record["metrics"] if m["world"] == "pooled"}


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    suite = SuiteConfig(methods=["routing", "history"], mappings=["permutation", "dense"], n_attr=[1], worlds=[0],
                        out=out / "runs", run={"users": 80})
    folders = run_suite(suite)
    assert len(folders) == 4  # each setting, and each setting under the no-history control
    return out


def test_suite_config_plans_every_setting_and_rejects_bad_input(tmp_path: Path) -> None:
    suite = load_suite(REPO / "configs" / "leaderboard.yaml")
    plans = plan_suite(suite)
    settings = ["sim-large__permutation__nattr1", "sim-large__permutation__nattr2",
                "sim-large__dense__nattr1", "sim-large__dense__nattr2"]
    assert [name for name, _ in plans] == [n for s in settings for n in (s, f"{s} (no-history)")]
    assert [c.control for _, c in plans] == [None, "no-history"] * 4
    assert all(c.worlds == [0, 1, 2] and not c.keep_artifacts for _, c in plans)
    assert [c.out for _, c in plans][:2] == [suite.out / settings[0]] * 2  # a control run lives with its setting
    assert {tuple(c.methods) for _, c in plan_suite(suite, only="cbpo")} == {("cbpo",)}
    with pytest.raises(ApmError, match="Did you mean .routing."):
        plan_suite(suite, only="rooting")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [routing]\nmappings: [circular]\n")
    with pytest.raises(ConfigError, match="mappings"):
        load_suite(bad)


def test_leaderboard_is_deterministic_and_its_check_catches_an_edited_metric(suite_runs: Path) -> None:
    runs, out = suite_runs / "runs", suite_runs / "board"
    first = build(runs, out)
    contents = [p.read_bytes() for p in (first.markdown, first.csv, first.png)]
    build(runs, out)
    assert [p.read_bytes() for p in (first.markdown, first.csv, first.png)] == contents
    check(runs, out)  # passes on what it just wrote
    table = pd.read_csv(first.csv)
    assert set(table["mapping"]) == {"permutation", "dense"}
    assert set(table["method"]) == {"oracle", "prior", "routing", "history"}
    assert table["simulator"].all() and "(simulator)" in first.markdown.read_text()
    assert "prior (reference: no history read)" in first.markdown.read_text()
    # the no-history column comes from each setting's control run, one value per method
    assert table["no_history_delta"].notna().all()
    for mapping, group in table.groupby("mapping"):
        pooled = _pooled_deltas(runs / f"sim-large__{mapping}__nattr1", control="no-history")
        for row in group.itertuples():
            assert row.no_history_delta == pytest.approx(pooled[row.method], abs=5e-5)
        by_method = group.set_index("method")
        assert by_method.loc["history", "no_history_delta"] == 0  # an empty history sends the baseline's request
        for reference in ("oracle", "prior"):  # they read no history, so the control changes nothing
            assert by_method.loc[reference, "no_history_delta"] == pytest.approx(by_method.loc[reference, "delta"], abs=5e-5)

    metrics = next(runs.rglob("metrics.json"))
    original = metrics.read_text()
    record = json.loads(original)
    row = next(m for m in record["metrics"] if m["method"] == "routing" and m["world"] == "pooled")
    row["delta"] += 0.25
    metrics.write_text(json.dumps(record))
    try:
        with pytest.raises(StaleLeaderboard, match="LEADERBOARD.md"):
            check(runs, out)
        proc = apm_inline("leaderboard", "--runs", str(runs), "--out", str(out), "--check", cwd=suite_runs)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    finally:
        metrics.write_text(original)
    check(runs, out)


def test_only_adds_one_methods_rows_from_its_newest_run(suite_runs: Path, tmp_path: Path) -> None:
    before = collect(suite_runs / "runs")
    suite = SuiteConfig(methods=["routing", "history"], mappings=["permutation"], n_attr=[1], worlds=[0],
                        out=suite_runs / "runs", run={"users": 80, "method_options": {"routing": {"regularisation": [1.0]}}})
    run_suite(suite, only="routing")
    after = collect(suite_runs / "runs")
    key = (after["mapping"] == "permutation") & (after["method"] == "routing")
    old_key = (before["mapping"] == "permutation") & (before["method"] == "routing")
    assert after.loc[key, "run_id"].item() != before.loc[old_key, "run_id"].item()
    keep = after["method"] == "history"
    assert after.loc[keep, "run_id"].tolist() == before.loc[before["method"] == "history", "run_id"].tolist()
    assert len(after) == len(before)


def test_length_control_removes_a_length_effect() -> None:
    rows = []
    for i in range(40):
        extra = i % 5  # the method writes 0-4 words more, and each extra word earns +0.5
        rows.append({"world": 0, "user_id": f"u{i}", "method": "baseline", "response": "a b c", "reward": 5.0})
        rows.append({"world": 0, "user_id": f"u{i}", "method": "m", "response": "a b c" + " x" * extra,
                     "reward": 5.0 + 0.2 + 0.5 * extra})
    samples = pd.DataFrame(rows)
    assert length_controlled_delta(samples, "m") == pytest.approx(0.2)
    raw = (samples[samples.method == "m"].reward.mean() - 5.0)
    assert raw == pytest.approx(1.2)


def test_the_committed_leaderboard_matches_the_committed_runs(tmp_path: Path) -> None:
    runs = REPO / "results" / "suite"
    if not runs.is_dir():
        pytest.fail("results/suite is missing: the committed leaderboard has no runs behind it")
    check(runs, REPO / "results")


def test_runs_in_worker_processes_record_what_runs_in_turn_record(tmp_path: Path) -> None:
    """The same suite in turn and two at a time, each on a fresh call cache (φ's int8 vectors move a
    little with the texts batched beside them, so both must start from nothing): equal Δ everywhere."""
    deltas = {}
    for jobs in (1, 2):
        suite = SuiteConfig(methods=["routing", "history"], mappings=["permutation", "dense"], n_attr=[1], worlds=[0],
                            out=tmp_path / f"runs-{jobs}", run={"users": 80, "cache": str(tmp_path / f"cache-{jobs}" / "calls.sqlite")})
        folders = run_suite(suite, jobs=jobs)
        assert len(folders) == 4 and all((f / "metrics.json").is_file() for f in folders)
        assert [f.parent.name for f in folders] == [name.split(" ")[0] for name, _ in plan_suite(suite)]  # plan order
        deltas[jobs] = {(setting, control): _pooled_deltas(tmp_path / f"runs-{jobs}" / setting, control)
                        for setting in ("sim-large__permutation__nattr1", "sim-large__dense__nattr1")
                        for control in (None, "no-history")}
    assert deltas[2] == deltas[1]
    assert all({"baseline", "routing", "history"} <= set(d) for d in deltas[2].values())


def test_runs_go_in_parallel_by_default_only_where_every_role_is_simulated() -> None:
    from apm_bench.machine import usable_cpus
    from apm_bench.reporting.suite import default_jobs
    from apm_bench.run.config import RunConfig

    simulated = [RunConfig(), RunConfig(control="no-history"), RunConfig(n_attr=2)]
    assert default_jobs(simulated) == min(usable_cpus(), 3)
    assert default_jobs(simulated[:1]) == 1
    real = RunConfig(model="qwen3.5-27b", allow_simulated_roles=True)
    assert default_jobs([*simulated, real]) == 1  # real engines would each load their model


def test_a_run_rated_by_another_judge_is_a_setting_of_its_own(suite_runs: Path, tmp_path: Path) -> None:
    """Δ under an LLM judge is not comparable with Δ under sim-judge: never one table."""
    import shutil

    from apm_bench.reporting.leaderboard import to_markdown

    source = next(f.parent for f in (suite_runs / "runs").rglob("config.json") if json.loads(f.read_text())["control"] is None)
    runs = tmp_path / "runs"
    for judge in ("sim-judge", "apm-tiny"):
        folder = runs / judge / source.name
        shutil.copytree(source, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "judge_model": None if judge == "sim-judge" else judge}))
    frame = collect(runs)
    assert sorted(set(frame["judge"])) == ["apm-tiny", "sim-judge"]
    assert frame.groupby("judge")["method"].apply(sorted).to_dict() == {
        judge: sorted(frame[frame["judge"] == "sim-judge"]["method"]) for judge in ("apm-tiny", "sim-judge")}
    titles = [line for line in to_markdown(frame).splitlines() if line.startswith("## ")]
    assert len(titles) == 2 and any("judge apm-tiny" in t for t in titles) and any("judge sim-judge" in t for t in titles)
