"""Validity study: do the no-history and shuffled-history controls stay at Δ = 0 across populations?

For every data seed (one population each) it runs the asked method under each control with the
default sizes and reports the pooled Δ, its 95 % CI and whether the CI excludes 0. Under a control
the true Δ is 0, so the share of CIs that contain 0 is the CI's coverage. Writes a JSON record.

    python benchmarks/controls.py --seeds 0-19 --controls no-history,shuffled-history
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def run_one(method: str, control: str, seed: int, cache: Path, embedder: HistoryEmbedder, extra: dict[str, Any]) -> dict[str, Any]:
    config = RunConfig(methods=[method], control=control, data_seed=seed, cache=cache, **extra)
    result = run_benchmark(config, embedder=embedder)
    rows = {(m.method, m.world): m for m in result.metrics}
    pooled = rows[(method, "pooled")]
    worlds = {m.world: round(m.delta, 4) for m in result.metrics if m.method == method and m.world != "pooled"}
    record = {"seed": seed, "control": control, "delta": round(pooled.delta, 4), "ci": [round(pooled.ci_low, 4), round(pooled.ci_high, 4)],
              "excludes_zero": pooled.ci_low > 0 or pooled.ci_high < 0, "worlds": worlds}
    if ("prior", "pooled") in rows:
        record["prior_delta"] = round(rows[("prior", "pooled")].delta, 4)
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    deltas = [r["delta"] for r in records]
    excluded = sum(r["excludes_zero"] for r in records)
    return {"runs": len(records), "mean_delta": round(statistics.fmean(deltas), 4), "max_abs_delta": round(max(map(abs, deltas)), 4),
            "cis_excluding_zero": excluded, "coverage": round(1 - excluded / len(records), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="routing")
    parser.add_argument("--seeds", default="0-19", help="data seeds: 0-19 or 1,5,9")
    parser.add_argument("--controls", default="no-history,shuffled-history")
    parser.add_argument("--option", action="append", default=[], help="extra RunConfig field as KEY=JSON, e.g. world_split=true")
    parser.add_argument("--cache", type=Path, default=None, help="call cache (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, default=Path("results/controls.json"))
    args = parser.parse_args()
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.option)}
    cache = args.cache or Path(tempfile.mkdtemp(prefix="apm-controls-")) / "calls.sqlite"
    embedder = HistoryEmbedder()
    started = time.perf_counter()
    records = []
    for control in args.controls.split(","):
        for seed in _seeds(args.seeds):
            records.append(run_one(args.method, control, seed, cache, embedder, extra))
            r = records[-1]
            print(f"{control:17s} seed {seed:3d}: Δ {r['delta']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
                  f"{'  excludes 0' if r['excludes_zero'] else ''}", flush=True)
    summary = {c: summarise([r for r in records if r["control"] == c]) for c in args.controls.split(",")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"method": args.method, "options": extra, "summary": summary, "runs": records,
                                    "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n", encoding="utf-8")
    for control, line in summary.items():
        print(f"{control}: {line}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
