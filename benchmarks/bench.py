"""`make bench`: whole `apm run` processes timed from process start, as numbers and as ratios.

- **cold**: the default run (`apm run --method routing`) in a new process on an empty call cache;
- **warm**: the same run again on its filled cache (what a rerun or a resumed run costs);
- **embed only**: a process that loads φ and embeds the default run's history texts, nothing
  else: the floor of a cold run, since everything else in it is cheap;
- **scaling**: cold runs of one world at 400, 1 600, 6 400 and 25 600 users: wall time and the
  process's peak memory, and how each grows (the exponent of a power-law fit; 1 = linear);
- **suite**: the leaderboard suite (`apm suite run configs/leaderboard.yaml`) on an empty cache;
- **tests**: `make test`'s command (the suite on parallel workers, `slow` tests left out), and
  `make test-slow`'s.

Every cold run gets a folder of its own: the call cache and the artifact store beside it (fitted
classifiers, adapters) are both empty, so no repeat reuses what an earlier one fitted.

Each timing is the median of `--repeats` runs. Ratios: cold / embed only, warm / cold, and the
vLLM paths' ratios to raw vLLM from `make bench-vllm`. Targets are written beside the figures,
with whether each is met. Writes results/bench.json (the `vllm` entry is kept) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ["run", "--method", "routing"]
SCALING_USERS = (400, 1600, 6400, 25600)
TARGETS = {"cold_default_s": 12.0, "warm_default_s": 4.0, "scaling_exponent": 1.15, "peak_25600_gib": 8.0,
           "suite_cold_s": 360.0, "tests_s": 240.0}
EMBED_ONLY = """
import sys
from apm_bench.methods.embedder import HistoryEmbedder
from apm_bench.run.config import RunConfig
from apm_bench.run.setup import load_pool_catalog, load_population
config = RunConfig(cache=None)
population = load_population(config, load_pool_catalog(config))
texts = sorted({m for user in population.users for m in user.history})
HistoryEmbedder().embed_texts(texts)
print(len(texts))
"""


def timed(command: list[str], env: dict[str, str] | None = None, check: bool = True) -> tuple[float, float]:
    """Wall seconds and peak resident memory (GiB) of one process, read from the OS when it exits;
    a failed process stops the benchmark unless `check` is off (the caller records the failure)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if check and os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode() if process.stderr else ''}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def apm(args: list[str], out: Path, folder: str) -> list[str]:
    """An `apm` command whose call cache (and so artifact store) lives in `out/folder`."""
    return [sys.executable, "-m", "apm_bench.cli", *args, "--out", str(out / "runs"), "--cache",
            str(out / folder / "calls.sqlite")]


def median_of(repeats: int, make_command) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(timed(make_command(i))[0] for i in range(repeats))


def growth_exponent(sizes: list[int], values: list[float]) -> float:
    """The slope of log(value) on log(size): 1 grows linearly, 2 quadratically."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def default_figures(out: Path, repeats: int) -> dict[str, float]:
    cold = median_of(repeats, lambda i: apm(DEFAULT_RUN, out, f"cold-{i}"))
    warm = median_of(repeats, lambda i: apm(DEFAULT_RUN, out, "cold-0"))
    embed = median_of(repeats, lambda i: [sys.executable, "-c", EMBED_ONLY])
    return {"cold_default_s": round(cold, 2), "warm_default_s": round(warm, 2), "embed_only_s": round(embed, 2),
            "cold_vs_embed_only": round(cold / embed, 2), "warm_vs_cold": round(warm / cold, 3)}


def scaling_figures(out: Path, sizes: tuple[int, ...]) -> dict[str, object]:
    rows = []
    for users in sizes:
        wall, peak = timed(apm(["run", "--method", "routing", "--worlds", "1", "--users", str(users)], out,
                               f"scale-{users}"))
        rows.append({"users": users, "wall_s": round(wall, 1), "peak_gib": round(peak, 2)})
        print(f"  {users:6d} users  {wall:7.1f} s  {peak:5.2f} GiB", flush=True)
    fitted = {"rows": rows}
    if len(rows) >= 2:
        fitted["wall_exponent"] = round(growth_exponent(list(sizes), [r["wall_s"] for r in rows]), 2)
        fitted["memory_exponent"] = round(growth_exponent(list(sizes), [r["peak_gib"] for r in rows]), 2)
    return fitted


def suite_figure(out: Path) -> dict[str, float]:
    """The leaderboard suite, cold, written into `out` instead of results/suite."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "leaderboard.yaml").read_text())
    config["out"] = str(out / "suite")
    path = out / "leaderboard.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "APM_CACHE": str(out / "suite-cache" / "calls.sqlite")}
    wall, peak = timed([sys.executable, "-m", "apm_bench.cli", "suite", "run", str(path)], env=env)
    print(f"suite (cold)             {wall:.1f} s, {peak:.2f} GiB", flush=True)
    return {"suite_cold_s": round(wall, 1), "suite_peak_gib": round(peak, 2)}


def test_figures() -> dict[str, float]:
    """`make test` and `make test-slow`, run as the Makefile runs them (one worker per core, up to 4)."""
    workers = str(min(4, os.cpu_count() or 1))
    figures = {}
    for name, marker in (("tests_s", "not slow"), ("slow_tests_s", "slow")):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers, "--dist",
                   "loadfile", "--no-loadscope-reorder", "-m", marker]
        started = time.perf_counter()
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        figures[name] = round(time.perf_counter() - started, 1)
        summary = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else process.stderr[-300:]
        figures[name.replace("_s", "_passed")] = process.returncode == 0
        print(f"{name:24s} {figures[name]} s  ({summary})", flush=True)
    return figures


def verdicts(figures: dict[str, float], scaling: dict[str, object]) -> dict[str, bool]:
    met = {"cold_default_s": figures["cold_default_s"] <= TARGETS["cold_default_s"],
           "warm_default_s": figures["warm_default_s"] <= TARGETS["warm_default_s"]}
    rows = scaling.get("rows") or []
    if "wall_exponent" in scaling:
        met["scaling_exponent"] = float(scaling["wall_exponent"]) <= TARGETS["scaling_exponent"]  # type: ignore[arg-type]
    largest = [r for r in rows if r["users"] == 25600]  # type: ignore[index]
    if largest:
        met["peak_25600_gib"] = largest[0]["peak_gib"] <= TARGETS["peak_25600_gib"]  # type: ignore[index]
    for name in ("suite_cold_s", "tests_s"):
        if name in figures:
            met[name] = figures[name] <= TARGETS[name] and figures.get("tests_passed", True) is not False
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", type=lambda s: tuple(int(v) for v in s.split(",")), default=SCALING_USERS,
                        help="user counts of the scaling runs (comma-separated; empty string: none)")
    parser.add_argument("--no-suite", dest="suite", action="store_false", help="leave out the leaderboard suite")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="leave out the test suite's timings")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="apm-bench-"))
    try:
        figures = default_figures(out, args.repeats)
        for name, value in figures.items():
            print(f"{name:24s} {value}", flush=True)
        print("scaling (one world, cold):", flush=True)
        scaling = scaling_figures(out, args.scaling) if args.scaling else {}
        if args.suite:
            figures.update(suite_figure(out))
        if args.tests:
            figures.update(test_figures())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    path = ROOT / "results" / "bench.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    vllm_ratios = (record.get("vllm") or {}).get("ratios")
    record = {"machine": platform.platform(), "cpus": os.cpu_count(), "repeats": args.repeats, "figures": figures,
              "scaling": scaling, "vllm_ratios": vllm_ratios, "targets": TARGETS,
              "met": verdicts(figures, scaling), **({"vllm": record["vllm"]} if "vllm" in record else {})}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record["met"]), "\nwrote results/bench.json")


if __name__ == "__main__":
    main()
