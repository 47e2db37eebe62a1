"""The leaderboard: recorded runs → `LEADERBOARD.md`, `leaderboard.csv` and `leaderboard.png`.

Rows come from run folders (metrics.json, config.json, samples.parquet) found anywhere under the
runs folder, grouped into settings (model, engine, mapping kind, n_attr, worlds, users, history
length). For each setting and method the newest run that has the method gives the row. The output
depends only on the recorded runs (no clocks, no machine facts), so the same runs give
byte-identical files and `apm leaderboard --check` can tell when committed files are stale.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from apm_bench.errors import ApmError, ConfigError, first_error
from apm_bench.inputs import read_text
from apm_bench.reporting.results import RunRecord

BASELINE, ORACLE, PRIOR = "baseline", "oracle", "prior"
#: reference rows and how the tables name them
REFERENCE_NAMES = {ORACLE: "oracle (upper bound)", PRIOR: "prior (reference: no history read)"}
DATA_KEY = "apm-leaderboard-data"  # PNG text chunk: the hash of the CSV the plot was drawn from
#: what makes two runs comparable: one table per distinct value
SETTING = ["model", "engine", "judge", "mapping", "n_attr", "worlds", "users", "history_len"]
COLUMNS = [
    "model", "simulator", "engine", "judge", "mapping", "n_attr", "worlds", "users", "history_len", "method", "n_users",
    "delta", "ci_low", "ci_high", "win", "tie", "loss", "gain", "lc_delta",
    "no_history_delta", "no_history_ci_low", "no_history_ci_high", "failed_ratings",
    "generation_calls", "training_steps", "fit_seconds", "run_id",
]


class StaleLeaderboard(ApmError):
    """The committed leaderboard files differ from what the recorded runs give."""


@dataclass(frozen=True)
class Setting:
    model: str
    simulator: bool
    engine: str
    judge: str
    mapping: str
    n_attr: int
    worlds: str
    users: int
    history_len: int

    @classmethod
    def of_row(cls, row: Any) -> Setting:
        """The setting of a leaderboard row (a frame row or a named tuple with the setting's columns)."""
        return cls(str(row.model), bool(row.simulator), str(row.engine), str(row.judge), str(row.mapping),
                   int(row.n_attr), str(row.worlds), int(row.users), int(row.history_len))

    @property
    def short_title(self) -> str:
        kind = "simulator" if self.simulator else self.engine
        return f"{self.model} ({kind}) · {self.mapping} · n_attr {self.n_attr}"

    @property
    def title(self) -> str:
        kind = "simulator" if self.simulator else self.engine
        return (f"{self.model} ({kind}) · judge {self.judge} · mapping {self.mapping} · n_attr {self.n_attr} · "
                f"worlds {self.worlds} · {self.users} users · {self.history_len} past messages")


def _engine(config: dict[str, Any]) -> str:
    from apm_bench.backends import resolve_model

    try:
        return resolve_model(config["model"], config.get("backend")).backend
    except ApmError:
        return str(config.get("backend") or "unknown")


def _setting(config: dict[str, Any]) -> Setting:
    engine = _engine(config)
    return Setting(
        model=str(config["model"]), simulator=engine == "sim", engine=engine, judge=str(config.get("judge_model") or "sim-judge"),
        mapping=str(config.get("mapping", "permutation")),
        n_attr=int(config.get("n_attr", 1)), worlds=",".join(str(w) for w in config["worlds"]),
        users=int(config.get("users", 0)), history_len=int(config.get("history_len", 0)),
    )


def length_controlled_delta(samples: pd.DataFrame, method: str) -> float | None:
    """The Δ left at equal length: regress per-user reward differences on response-length
    differences (in words) and take the intercept, as AlpacaEval's length control does for win rates."""
    base = samples[samples["method"] == BASELINE].set_index(["world", "user_id"])
    rows = samples[samples["method"] == method].set_index(["world", "user_id"])
    joined = rows[["response", "reward"]].merge(base[["response", "reward"]], left_index=True, right_index=True,
                                                 suffixes=("", "_base")).dropna(subset=["reward", "reward_base"])
    if joined.empty:
        return None
    difference = (joined["reward"] - joined["reward_base"]).to_numpy(dtype=float)
    length = (joined["response"].str.split().str.len() - joined["response_base"].str.split().str.len()).to_numpy(dtype=float)
    if np.ptp(length) == 0:
        return float(difference.mean())
    design = np.column_stack([np.ones_like(length), length])
    intercept, _ = np.linalg.lstsq(design, difference, rcond=None)[0]
    return float(intercept)


def read_run_folder(folder: Path) -> tuple[RunRecord, dict[str, Any], pd.DataFrame | None]:
    """metrics.json, config.json and the samples a leaderboard reads; a damaged run folder is one
    error naming it and the file, so one bad folder never hides behind a traceback."""
    try:
        record = RunRecord.model_validate_json(read_text(folder / "metrics.json", "run record", ConfigError))
    except ValidationError as exc:
        raise ConfigError(f"run folder {folder}: metrics.json is not a run record ({first_error(exc)})") from None
    try:
        config = json.loads(read_text(folder / "config.json", "run config", ConfigError))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run folder {folder}: config.json is not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"run folder {folder}: config.json must hold a JSON object")
    samples_path = folder / "samples.parquet"
    samples = None
    if samples_path.is_file():
        try:
            samples = pd.read_parquet(samples_path, columns=["world", "user_id", "method", "response", "reward"])
        except Exception as exc:  # pyarrow raises many kinds for a damaged or foreign file
            raise ConfigError(f"run folder {folder}: samples.parquet cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    return record, config, samples


def _run_rows(folder: Path) -> list[dict[str, Any]]:
    record, config, samples = read_run_folder(folder)
    control = config.get("control") or ""
    try:
        setting = _setting(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"run folder {folder}: config.json lacks a valid {exc} entry") from None
    rows = []
    for m in record.metrics:
        if m.world != "pooled" or m.method == BASELINE:
            continue
        costs = record.costs
        rows.append({
            **setting.__dict__, "method": m.method, "n_users": m.n_users, "delta": m.delta, "ci_low": m.ci_low,
            "ci_high": m.ci_high, "win": m.win, "tie": m.tie, "loss": m.loss, "gain": m.gain,
            "lc_delta": length_controlled_delta(samples, m.method) if samples is not None else None,
            "failed_ratings": m.failed_ratings,
            "generation_calls": int(costs.get(f"generate:{m.method}", {}).get("calls", 0)),
            "training_steps": int(costs.get(f"fit:{m.method}", {}).get("training_steps", 0)),
            "fit_seconds": round(costs.get(f"fit:{m.method}", {}).get("seconds", 0.0), 1),
            "run_id": record.run_id, "_created": record.created, "_control": control,
        })
    return rows


def collect(runs: Path) -> pd.DataFrame:
    """One row per (setting, method): the newest recorded run that has the method."""
    folders = sorted(p.parent for p in Path(runs).rglob("metrics.json") if not p.parent.name.startswith(".tmp-"))
    rows = [row for folder in folders for row in _run_rows(folder)]
    if not rows:
        raise ApmError(f"no recorded runs under {runs} (run `apm suite run CONFIG` first)")
    frame = pd.DataFrame(rows).sort_values(["_created", "run_id"])
    frame = frame.drop_duplicates(SETTING + ["method", "_control"], keep="last").drop(columns="_created")
    controls = frame[frame["_control"] == "no-history"].set_index(SETTING + ["method"])[["delta", "ci_low", "ci_high"]]
    frame = frame[frame["_control"] == ""].drop(columns="_control")
    if frame.empty:
        raise ApmError(f"only control runs under {runs}: a leaderboard needs the runs they control")
    frame = frame.join(controls.add_prefix("no_history_"), on=SETTING + ["method"])
    frame["_order"] = frame["method"].map({ORACLE: 0, PRIOR: 1}).fillna(2)
    frame = frame.sort_values(["simulator", *SETTING, "_order", "delta", "method"],
                              ascending=[True] * (1 + len(SETTING)) + [True, False, True])
    return frame.drop(columns="_order")[COLUMNS].reset_index(drop=True)


def to_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")


def _fmt(value: Any, pattern: str) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, pattern)


def to_markdown(frame: pd.DataFrame) -> str:
    lines = [
        "# apm-bench leaderboard",
        "",
        "Generated by `apm leaderboard` from the runs recorded under `results/suite/` (do not edit by hand; CI checks",
        "it with `apm leaderboard --check`). Δ = mean over test users of R(method) − R(baseline) on the same prompts,",
        "95 % CI from a seeded bootstrap over worlds and users; W/T/L = share of users the method wins, ties, loses",
        "against the baseline; gain = Δ / Δ(oracle); LC Δ = the Δ left after regressing per-user reward differences",
        "on response-length differences (AlpacaEval-style length control); failures = judge ratings that failed",
        "(never scored); cost = generation calls, training steps and fit seconds per run.",
        "",
        "Reference rows: the oracle instructs each user's true top target (the upper bound); the prior gives every user",
        "the one instruction that scored best over training users, reading no history: what any method gets for free.",
        "No-history Δ = the same method run with empty histories (the control): it should contain 0, and a method",
        "whose no-history Δ is as large as its Δ is not reading histories.",
        "",
        "Rows marked *simulator* come from the embedded style simulator: they show whether a method infers and acts",
        "on hidden preferences in a controlled world, not how it does on real LLMs.",
        "",
        "![Δ with 95 % CI per method and setting](leaderboard.png)",
    ]
    for _, rows in frame.groupby(SETTING, sort=False):
        lines += ["", f"## {Setting.of_row(rows.iloc[0]).title}", "",
                  "| method | Δ | 95 % CI | W/T/L | gain | LC Δ | no-history Δ [95 % CI] | failures | cost (calls · steps · fit s) |",
                  "|---|---:|---|---|---:|---:|---|---:|---|"]
        for r in rows.itertuples():
            control = "–" if pd.isna(r.no_history_delta) else (
                f"{r.no_history_delta:+.3f} [{r.no_history_ci_low:+.3f}, {r.no_history_ci_high:+.3f}]")
            lines.append(
                f"| {REFERENCE_NAMES.get(r.method, r.method)} | {r.delta:+.3f} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | "
                f"{r.win:.2f}/{r.tie:.2f}/{r.loss:.2f} | {_fmt(r.gain, '.2f')} | {_fmt(r.lc_delta, '+.3f')} | {control} | "
                f"{r.failed_ratings} | {r.generation_calls} · {r.training_steps} · {r.fit_seconds:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _data_hash(csv_text: str) -> str:
    return hashlib.sha256(csv_text.encode("utf-8")).hexdigest()


def to_png(frame: pd.DataFrame, csv_text: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(frame.groupby(SETTING, sort=False))
    columns = min(len(groups), 2)
    rows = -(-len(groups) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.6 * rows), dpi=110, squeeze=False)
    for axis in axes.flat[len(groups):]:
        axis.axis("off")
    for axis, (_, group) in zip(axes.flat, groups):
        title = Setting.of_row(group.iloc[0]).short_title
        group = group[group["method"] != ORACLE]
        positions = np.arange(len(group))
        errors = [group["delta"] - group["ci_low"], group["ci_high"] - group["delta"]]
        axis.bar(positions, group["delta"], color=["#4c72b0" if d >= 0 else "#c44e52" for d in group["delta"]], width=0.6)
        axis.errorbar(positions, group["delta"], yerr=errors, fmt="none", ecolor="black", capsize=3, linewidth=1)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xticks(positions, group["method"], rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.set_ylabel("Δ vs baseline (95 % CI)", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None, DATA_KEY: _data_hash(csv_text)})
    plt.close(figure)
    return buffer.getvalue()


def png_data_hash(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get(DATA_KEY)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Outputs:
    markdown: Path
    csv: Path
    png: Path

    @classmethod
    def under(cls, folder: Path) -> Outputs:
        return cls(folder / "LEADERBOARD.md", folder / "leaderboard.csv", folder / "leaderboard.png")


def build(runs: Path, out: Path) -> Outputs:
    """Write the three files (each replaced atomically); returns their paths."""
    frame = collect(runs)
    csv_text = to_csv(frame)
    outputs = Outputs.under(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, content in ((outputs.csv, csv_text.encode()), (outputs.markdown, to_markdown(frame).encode()),
                          (outputs.png, to_png(frame, csv_text))):
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_bytes(content)
        staging.replace(path)
    return outputs


def check(runs: Path, out: Path) -> None:
    """Raise StaleLeaderboard naming the first committed file that differs from the recorded runs.

    The Markdown and CSV must match byte for byte; the PNG must carry the hash of that CSV (its
    pixels depend on the font rasteriser, which is not the runs' business)."""
    frame = collect(runs)
    csv_text = to_csv(frame)
    outputs = Outputs.under(out)
    for path, expected in ((outputs.markdown, to_markdown(frame)), (outputs.csv, csv_text)):
        if not path.is_file() or path.read_text(encoding="utf-8") != expected:
            raise StaleLeaderboard(f"{path} does not match the runs under {runs}; regenerate it with `apm leaderboard`")
    if not outputs.png.is_file() or png_data_hash(outputs.png) != _data_hash(csv_text):
        raise StaleLeaderboard(f"{outputs.png} was not drawn from the runs under {runs}; regenerate it with `apm leaderboard`")
