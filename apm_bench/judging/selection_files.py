"""Files of `apm select-attributes`: the rating matrix it reads and the pools it writes.

The rating matrix is what a judge produced (responses × candidate attributes), as the APM authors
save it (.npy, names in a separate list such as their candidate_attributes configs) or as a table
whose columns are the names (.csv, .parquet). Every problem with it is found before any analysis.
The pools are written in the catalog's own pools.yaml format, so a folder of them drops into a
catalog (`principles/` or `personas/`) as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from apm_bench.errors import ApmError
from apm_bench.inputs import parse_yaml
from apm_bench.judging.attribute_selection import AttributeSelection
from apm_bench.world.catalog import POOLS_FILE
from apm_bench.world.histories import attribute_id_from_name

TABLE_SUFFIXES = (".csv", ".parquet")
MATRIX_SUFFIX = ".npy"
SUMMARY_FILE = "selection.json"
SCREE_FILE = "scree.png"


class RatingsFileError(ApmError):
    """A rating matrix or its names file is missing, malformed or unusable."""


# --------------------------------------------------------------------------- reading


def load_names(path: Path) -> list[str]:
    """A YAML list, a YAML mapping with `candidate_attributes` (the authors' configs), or text with
    one name a line (blank lines and # comments skipped)."""
    if not path.is_file():
        raise RatingsFileError(f"names file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = parse_yaml(text)
        except yaml.YAMLError as exc:
            raise RatingsFileError(f"malformed YAML in {path}: {str(exc).splitlines()[0]}") from None
        if isinstance(data, dict):
            data = data.get("candidate_attributes")
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise RatingsFileError(f"{path} needs a list of names, at the top level or under 'candidate_attributes'")
        return [n.strip() for n in data]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_table(path: Path) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas and pyarrow raise many kinds; each means the file is unreadable
        raise RatingsFileError(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from None
    text = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise RatingsFileError(f"{path}: column {text[0]!r} is not numeric (every column must hold ratings)")
    return frame.to_numpy(dtype=np.float64), [str(c).strip() for c in frame.columns]


def _read_matrix(path: Path, names_path: Path | None) -> tuple[np.ndarray, list[str]]:
    if names_path is None:
        raise RatingsFileError(f"{path} holds no attribute names: give them with --names FILE")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RatingsFileError(f"cannot read {path} as a numpy array: {' '.join(str(exc).split())[:200]}") from None
    if not np.issubdtype(matrix.dtype, np.number) or np.issubdtype(matrix.dtype, np.complexfloating):
        raise RatingsFileError(f"{path} holds {matrix.dtype} values, not real-valued ratings")
    return matrix.astype(np.float64), load_names(names_path)


def load_ratings(path: Path, names_path: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """(responses × attributes matrix, attribute names), checked: 2-D, finite, one unique name per column."""
    path = Path(path)
    if not path.is_file():
        raise RatingsFileError(f"ratings file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == MATRIX_SUFFIX:
        matrix, names = _read_matrix(path, names_path)
    elif suffix in TABLE_SUFFIXES:
        if names_path is not None:
            raise RatingsFileError(f"{path} names its attributes in its columns; --names is for .npy files")
        matrix, names = _read_table(path)
    else:
        raise RatingsFileError(f"{path}: ratings must be .npy, .csv or .parquet, not {suffix or 'a file without suffix'}")
    _check(path, matrix, names)
    return matrix, names


def _check(path: Path, matrix: np.ndarray, names: list[str]) -> None:
    if matrix.ndim != 2:
        raise RatingsFileError(f"{path} holds a {matrix.ndim}-D array; ratings are responses × attributes (2-D)")
    rows, cols = matrix.shape
    if rows < 3 or cols < 2:
        raise RatingsFileError(f"{path} has {rows} responses × {cols} attributes; at least 3 × 2 are needed")
    if len(names) != cols:
        raise RatingsFileError(f"{len(names)} attribute names for {cols} rating columns in {path}")
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise RatingsFileError(f"{path} has {int(bad.sum())} missing or infinite ratings "
                               f"(first: response {row}, attribute {names[col]!r}); fill or drop them first")
    ids: dict[str, str] = {}
    for name in names:
        key = attribute_id_from_name(name)
        if not key:
            raise RatingsFileError(f"{path}: an attribute has an empty name")
        if key in ids:
            raise RatingsFileError(f"{path}: attributes {ids[key]!r} and {name!r} share the catalog id {key!r}")
        ids[key] = name


def check_new_folder(out: Path) -> None:
    """Results are never overwritten: the output folder must be new (or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RatingsFileError(f"{out} already exists and is not an empty folder; choose a new --out")


# --------------------------------------------------------------------------- writing


def _pools_yaml(pools: dict[int, list[str]], source: str) -> str:
    header = (
        f"# Pools chosen by `apm select-attributes` from {source}: one attribute per varimax-rotated\n"
        "# component, for each k up to k95. Ids are the rated names in lower case, with spaces and\n"
        f"# hyphens as underscores. Put this file into a catalog folder as {POOLS_FILE}; every id\n"
        "# needs an entry of the same id in that folder's principles.yaml or attributes.yaml.\n"
    )
    return header + yaml.safe_dump({"pools": pools}, sort_keys=False, default_flow_style=None, width=120)


def write_selection(result: AttributeSelection, out: Path, source: Path) -> list[Path]:
    """pools.yaml (every k), pool_k<k>.yaml (one k each), selection.json and scree.png."""
    out.mkdir(parents=True, exist_ok=True)
    pools = {p.k: [attribute_id_from_name(n) for n in p.attributes] for p in result.pools}
    written = [out / POOLS_FILE] if pools else []
    if pools:
        (out / POOLS_FILE).write_text(_pools_yaml(pools, source.name), encoding="utf-8")
    for k, ids in pools.items():
        path = out / f"pool_k{k}.yaml"
        path.write_text(_pools_yaml({k: ids}, source.name), encoding="utf-8")
        written.append(path)
    (out / SUMMARY_FILE).write_text(result.model_dump_json(indent=2), encoding="utf-8")
    plot_scree(result, out / SCREE_FILE)
    return [*written, out / SUMMARY_FILE, out / SCREE_FILE]


def plot_scree(result: AttributeSelection, path: Path, shown: int = 60) -> None:
    """Eigenvalues against the parallel-analysis threshold: components left of k95 beat chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(shown, len(result.eigenvalues))
    ranks = np.arange(1, count + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(ranks, result.eigenvalues[:count], "o-", color="tab:blue", label="ratings")
    ax.plot(ranks, result.thresholds[:count], "--", color="tab:red",
            label=f"random data, {result.percentile:g}th percentile")
    ax.axvline(result.k95, color="tab:red", linestyle=":", alpha=0.6, label=f"k95 = {result.k95}")
    ax.set_xlabel("component")
    ax.set_ylabel("eigenvalue of the correlation matrix")
    ax.set_title(f"Scree plot with parallel analysis ({len(result.kept)} attributes, {result.n_responses} responses)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
