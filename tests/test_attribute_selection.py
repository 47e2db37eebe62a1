"""Attribute selection (the APM paper's factor analysis) and runs on the authors' pools.

The planted rating matrix has three latent factors with four noisy attributes each, two
near-constant attributes (a judge that almost always says 1) and two attributes of pure noise. The
analysis must drop the near-constant ones, find k95 = 3 and pick one attribute of each factor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from apm_bench.judging.attribute_selection import (
    AttributeSelection,
    SelectionError,
    correlation_eigen,
    parallel_analysis,
    rating_entropy,
    rotated_loadings,
    select_attributes,
    varimax,
)
from apm_bench.judging.selection_files import RatingsFileError, load_ratings
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.reporting.results import write_run
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from apm_bench.world.catalog import load_catalog
from apm_bench.world.histories import attribute_id_from_name

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "warmth": ["warm", "kind-hearted", "friendly tone", "caring"],
    "length": ["long", "detailed", "wordy", "in depth"],
    "register": ["formal", "stiff", "polished", "official"],
}
FLAT = ["uses emoji", "all caps"]
NOISE = ["noise one", "noise two"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted_ratings(n: int = 1000, seed: int = 7) -> tuple[np.ndarray, list[str]]:
    """Integer ratings 1..10; columns shuffled so that nothing depends on their order."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, len(GROUPS)))
    columns, names = [], []
    for f, members in enumerate(GROUPS.values()):
        for j, name in enumerate(members):
            loading = 0.85 - 0.1 * j
            latent = loading * factors[:, f] + np.sqrt(1 - loading**2) * rng.standard_normal(n)
            columns.append(np.clip(np.rint(5.5 + 1.8 * latent), 1, 10))
            names.append(name)
    for name in FLAT:
        columns.append(np.where(rng.random(n) < 0.92, 1.0, 2.0))
        names.append(name)
    for name in NOISE:
        columns.append(rng.integers(1, 11, n).astype(float))
        names.append(name)
    order = rng.permutation(len(names))
    return np.column_stack([columns[i] for i in order]), [names[i] for i in order]


def group_of(name: str) -> str | None:
    return next((g for g, members in GROUPS.items() if name in members), None)


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, list[str]]:
    return planted_ratings()


@pytest.fixture(scope="module")
def selection(planted: tuple[np.ndarray, list[str]]) -> AttributeSelection:
    return select_attributes(*planted, min_entropy=1.5, seed=0)


# --------------------------------------------------------------------------- the steps


def test_entropy_is_in_bits_of_the_rounded_rating_distribution() -> None:
    assert rating_entropy(np.array([1, 2, 3, 4] * 25, dtype=float)) == pytest.approx(2.0)
    assert rating_entropy(np.full(50, 7.0)) == 0.0
    assert rating_entropy(np.array([0.8, 1.2, 1.4, 2.2] * 10)) == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))


def test_varimax_recovers_a_simple_structure_hidden_by_a_rotation() -> None:
    simple = np.zeros((9, 3))
    for f in range(3):
        simple[3 * f : 3 * f + 3, f] = [0.9, 0.8, 0.7]
    angle = 0.6
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    mixed = simple @ turn @ np.roll(np.eye(3), 1, axis=0) @ turn.T
    assert np.abs(mixed - simple).max() > 0.3  # the rotation did hide the structure
    recovered = varimax(mixed)
    # the same structure up to the order and signs of the components
    matched = np.abs(recovered)[:, np.argmax(np.abs(recovered[[0, 3, 6]]), axis=1)]
    assert np.allclose(matched, simple, atol=1e-6)
    assert np.allclose(recovered @ recovered.T, mixed @ mixed.T)  # an orthogonal rotation: communalities kept


def test_parallel_analysis_is_seeded_and_beats_noise_only_by_chance() -> None:
    first = parallel_analysis(300, 8, seed=3, iterations=40)
    assert np.array_equal(first, parallel_analysis(300, 8, seed=3, iterations=40))
    assert not np.array_equal(first, parallel_analysis(300, 8, seed=4, iterations=40))
    assert np.all(np.diff(first) < 0) and first[0] > 1 > first[-1]
    noise = np.random.default_rng(0).integers(1, 11, (300, 8)).astype(float)
    result = select_attributes(noise, [f"n{i}" for i in range(8)], seed=0, iterations=40)
    assert result.k95 == 1 and result.pools == []


def test_too_few_varying_attributes_is_an_input_error() -> None:
    rng = np.random.default_rng(1)
    ratings = np.column_stack([rng.integers(1, 11, 50), np.ones(50), np.where(rng.random(50) < 0.95, 1, 2)])
    with pytest.raises(SelectionError, match="only 1 of 3 attributes pass"):
        select_attributes(ratings.astype(float), ["varied", "constant", "nearly constant"])


# --------------------------------------------------------------------------- planted recovery


def test_entropy_filter_drops_the_near_constant_attributes(selection: AttributeSelection) -> None:
    assert set(selection.dropped) == set(FLAT)
    assert all(selection.dropped[name] < 1.5 for name in FLAT)
    assert set(selection.kept) == {n for members in GROUPS.values() for n in members} | set(NOISE)
    assert all(selection.entropy[name] >= 1.5 for name in selection.kept)


def test_parallel_analysis_finds_the_three_planted_factors(selection: AttributeSelection) -> None:
    assert selection.k95 == 3
    assert [p.k for p in selection.pools] == [2, 3]
    eigenvalues, thresholds = selection.eigenvalues, selection.thresholds
    assert all(eigenvalues[i] > thresholds[i] for i in range(3)) and eigenvalues[3] < thresholds[3]


def test_varimax_groups_the_planted_attributes_by_factor(planted: tuple[np.ndarray, list[str]],
                                                          selection: AttributeSelection) -> None:
    ratings, names = planted
    kept = [names.index(n) for n in selection.kept]
    eigenvalues, eigenvectors = correlation_eigen(ratings[:, kept])
    loadings = rotated_loadings(eigenvalues, eigenvectors, 3)
    home = {name: int(np.argmax(np.abs(row))) for name, row in zip(selection.kept, loadings)}
    components = {g: {home[n] for n in members} for g, members in GROUPS.items()}
    assert all(len(c) == 1 for c in components.values()), components  # each group on one component
    assert len(set.union(*components.values())) == 3  # and each on its own
    for name, row in zip(selection.kept, loadings):
        if group_of(name):
            assert np.abs(row).max() > 0.5, (name, row)
        else:
            assert np.abs(row).max() < 0.2, (name, row)  # noise loads on nothing


def test_one_representative_per_planted_factor(selection: AttributeSelection) -> None:
    three = selection.pool(3)
    assert sorted(group_of(a) for a in three.attributes) == sorted(GROUPS)
    for factor in three.factors:
        # the strongest of its group (the planted loadings fall from the first member to the last)
        assert factor.attribute == GROUPS[group_of(factor.attribute)][0]
        assert factor.loading > 0.7
        assert {group_of(n) for n in list(factor.top)[:4]} == {group_of(factor.attribute)}
    assert [f.factor for f in three.factors] == [1, 2, 3]
    assert three.factors[0].variance >= three.factors[1].variance >= three.factors[2].variance
    two = selection.pool(2)
    assert len({group_of(a) for a in two.attributes}) == 2


# --------------------------------------------------------------------------- the command


def apm(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="4000", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "apm_bench.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _planted_principle(name: str) -> dict:
    key = attribute_id_from_name(name)
    return {"id": key, "name": name.capitalize(), "description": f"Rated as {name}.", "rubric": f"How {name}.",
            "follow_instruction": f"Be {name}.", "avoid_instruction": f"Do not be {name}.", "keywords": [name],
            "sim": {"follow_markers": [f"Planted {key} shows, {i}." for i in range(3)],
                    "avoid_markers": [f"Planted {key} is absent, {i}." for i in range(3)]}}


def test_select_attributes_writes_pools_a_catalog_loads(planted: tuple[np.ndarray, list[str]], tmp_path: Path) -> None:
    import pandas as pd

    ratings, names = planted
    table = tmp_path / "ratings.csv"
    pd.DataFrame(ratings, columns=names).to_csv(table, index=False)
    proc = apm("select-attributes", table, "--out", tmp_path / "out", "--seed", 0, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "k95 = 3" in proc.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["pool_k2.yaml", "pool_k3.yaml", "pools.yaml", "scree.png",
                                                     "selection.json"]
    assert (out / "scree.png").read_bytes().startswith(PNG_MAGIC)
    summary = AttributeSelection.model_validate_json((out / "selection.json").read_text())
    assert summary.k95 == 3 and set(summary.dropped) == set(FLAT)
    pools = yaml.safe_load((out / "pools.yaml").read_text())["pools"]
    assert yaml.safe_load((out / "pool_k3.yaml").read_text())["pools"] == {3: pools[3]}
    assert pools[3] == [attribute_id_from_name(n) for n in summary.pool(3).attributes]

    # the pools drop into a catalog folder as its pools.yaml
    principles, personas = tmp_path / "principles", tmp_path / "personas"
    shutil.copytree(ROOT / "principles", principles)
    shutil.copytree(ROOT / "personas", personas)
    data = yaml.safe_load((principles / "principles.yaml").read_text())
    data["principles"] += [_planted_principle(n) for n in summary.kept]
    (principles / "principles.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.copy(out / "pools.yaml", principles / "pools.yaml")
    catalog = load_catalog(principles, personas)
    assert catalog.largest_pool == 3
    pool = catalog.with_pool(3)
    assert pool.principle_ids == pools[3]
    assert sorted(group_of(p.name.lower()) for p in pool.principles) == sorted(GROUPS)

    # the authors' format: a .npy matrix with names in a candidate_attributes config
    np.save(tmp_path / "ratings.npy", ratings)
    (tmp_path / "names.yaml").write_text("# @package _global_\n" + yaml.safe_dump({"candidate_attributes": names}))
    proc = apm("select-attributes", tmp_path / "ratings.npy", "--names", tmp_path / "names.yaml",
               "--out", tmp_path / "out-npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((tmp_path / "out-npy" / "pools.yaml").read_text())["pools"] == pools


@pytest.mark.parametrize("case", ["nan", "npy without names", "existing out"])
def test_select_attributes_bad_input_is_one_error_line_before_any_work(case: str, tmp_path: Path) -> None:
    ratings, names = planted_ratings(n=60)
    out = tmp_path / "out"
    if case == "nan":
        import pandas as pd

        ratings[5, 2] = np.nan
        source = tmp_path / "ratings.csv"
        pd.DataFrame(ratings, columns=names).to_csv(source, index=False)
        expected = f"1 missing or infinite ratings (first: response 5, attribute {names[2]!r})"
    elif case == "npy without names":
        source = tmp_path / "ratings.npy"
        np.save(source, ratings)
        expected = "give them with --names FILE"
    else:
        source = tmp_path / "ratings.npy"
        np.save(source, ratings)
        out.mkdir()
        (out / "keep.txt").write_text("earlier results")
        expected = "already exists"
    proc = apm("select-attributes", source, "--out", out, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert proc.stdout == ""
    assert (sorted(p.name for p in out.iterdir()) == ["keep.txt"]) if out.exists() else True
    assert case == "existing out" or not out.exists()


def _save(path: Path, ratings: np.ndarray) -> Path:
    np.save(path, ratings)
    return path


@pytest.mark.parametrize(("case", "expected"), [
    ("1-D", "1-D array"),
    ("names mismatch", "16 attribute names for 15 rating columns"),
    ("text column", "is not numeric"),
    ("suffix", "must be .npy, .csv or .parquet"),
    ("same id", "share the catalog id 'in_depth'"),
    ("names for a table", "--names is for .npy files"),
    ("too small", "at least 3 × 2"),
])
def test_load_ratings_rejects_bad_files(case: str, expected: str, tmp_path: Path) -> None:
    import pandas as pd

    ratings, names = planted_ratings(n=40)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names) + "\n")
    frame = pd.DataFrame(ratings, columns=names)
    args: tuple[Path, Path | None]
    if case == "1-D":
        args = (_save(tmp_path / "r.npy", ratings[:, 0]), names_file)
    elif case == "names mismatch":
        args = (_save(tmp_path / "r.npy", ratings[:, 1:]), names_file)
    elif case == "text column":
        frame.insert(0, "comment", "see notes")
        frame.to_csv(tmp_path / "r.csv", index=False)
        args = (tmp_path / "r.csv", None)
    elif case == "suffix":
        args = (tmp_path / "r.json", None)
        args[0].write_text("{}")
    elif case == "same id":
        frame.rename(columns={"warm": "in-depth"}).to_parquet(tmp_path / "r.parquet")
        args = (tmp_path / "r.parquet", None)
    elif case == "names for a table":
        frame.to_csv(tmp_path / "r.csv", index=False)
        args = (tmp_path / "r.csv", names_file)
    else:
        args = (_save(tmp_path / "r.npy", ratings[:2]), names_file)
    with pytest.raises(RatingsFileError) as info:
        load_ratings(*args)
    assert expected in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- runs on the authors' pools


def _run(pool: int, embedder: HistoryEmbedder, out: Path | None = None):  # type: ignore[no-untyped-def]
    config = RunConfig(methods=["prior"], worlds=[0], users=40, history_len=2, pool=pool, cache=None,
                       bootstrap_resamples=200, **({"out": out} if out else {}))
    return run_benchmark(config, embedder=embedder)


def test_pool_2_runs_on_the_authors_k2_principles_and_attributes(embedder: HistoryEmbedder, tmp_path: Path) -> None:
    result = _run(2, embedder, tmp_path)
    folder = write_run(result, 1.0)
    config = json.loads((folder / "config.json").read_text())
    assert config["pool"] == 2
    assert config["pool_members"] == {"principles": ["emotionally_neutral", "teacher_to_student_tone"],
                                      "attributes": ["conversational", "neutral"]}
    import pandas as pd

    samples = pd.read_parquet(folder / "samples.parquet")
    targets = {t["principle"] for ts in samples["targets"] for t in ts}
    assert targets == {"emotionally_neutral", "teacher_to_student_tone"}
    # the users' messages show the k = 2 attributes' phrases and no other attribute's
    full = load_catalog()
    owners = {ph: a.id for a in full.attributes for side in ("follow", "avoid") for ph in a.side(side).phrases}
    shown = {owner for prompt in samples["prompt"] for ph, owner in owners.items() if ph in prompt}
    assert shown == {"conversational", "neutral"}


@pytest.mark.parametrize("k", [4, 6, 8])
def test_runs_on_the_authors_pools_complete(k: int, embedder: HistoryEmbedder) -> None:
    result = _run(k, embedder)
    pool = load_catalog().with_pool(k)
    assert result.pool_members == {"principles": pool.principle_ids, "attributes": pool.attribute_ids}
    targets = {t["principle"] if isinstance(t, dict) else t.principle for ts in result.samples["targets"] for t in ts}
    assert targets <= set(pool.principle_ids)
    oracle = next(m for m in result.metrics if m.method == "oracle" and m.world == "pooled")
    assert oracle.n_users > 0 and oracle.delta > 0  # the simulator renders and judges the new principles
