"""`make bench`: wall times of whole `apm run` commands from process start.

Each command runs cold (a new process and an empty call cache of its own); the default run is
then repeated on its filled cache (warm: what a rerun or a resumed run costs). Writes
results/bench.json and prints a table. Target: the cold default run ≤ 60 s on a 2-core machine.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "default (routing)": ["run", "--method", "routing"],
    "all four methods": ["run", "--method", "baseline,oracle,history,routing"],
    "routing, all label strategies": ["run", "--method", "routing", "--label-strategy", "all"],
}


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    out = Path(tempfile.mkdtemp(prefix="apm-bench-"))
    timings = {}
    plan = [(f"{name}, cold", args, out / f"cache-{index}.sqlite") for index, (name, args) in enumerate(RUNS.items())]
    plan.append(("default (routing), warm cache", RUNS["default (routing)"], out / "cache-0.sqlite"))
    try:
        for name, args, cache in plan:
            started = time.perf_counter()
            command = [sys.executable, "-m", "apm_bench.cli", *args, "--out", str(out / "runs"), "--cache", str(cache)]
            subprocess.run(command, cwd=root, check=True, stdout=subprocess.DEVNULL)
            timings[name] = round(time.perf_counter() - started, 1)
            print(f"{name:40s} {timings[name]:6.1f} s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    path = root / "results" / "bench.json"
    record = json.loads(path.read_text()) if path.is_file() else {}  # keeps the vllm entry of `make bench-vllm`
    record.update({"machine": platform.platform(), "cpus": __import__("os").cpu_count(), "seconds": timings,
                   "target_default_s": 60})
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print("wrote results/bench.json")


if __name__ == "__main__":
    main()
