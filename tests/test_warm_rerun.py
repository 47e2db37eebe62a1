"""A rerun whose every answer is cached must not pay for what it does not compute, and a cold
routing run on the simulator, which trains nothing, does not load torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from apm_bench.methods.onnx_encoder import OnnxEncoder, export_int8

HEAVY = ("torch", "sklearn", "sentence_transformers", "transformers", "onnxruntime")
RUN = """
import sys
from apm_bench.cli import main
sys.argv = ["apm", "run", "--method", "routing", "--users", "40", "--worlds", "2", "--history-len", "2",
            "--out", sys.argv[1], "--cache", sys.argv[2]]
try:
    main()
finally:
    print("loaded:", ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def _run(tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    completed = subprocess.run([sys.executable, "-c", RUN.format(heavy=HEAVY), str(tmp_path / "runs"),
                                str(tmp_path / "calls.sqlite")], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return completed.stderr.strip().splitlines()[-1]


def test_a_warm_rerun_imports_no_model_library(tmp_path: Path) -> None:
    encoder = OnnxEncoder()
    if not encoder.model_file.exists():  # the one-off export needs torch: not what this test measures
        export_int8(encoder.model_path, encoder.model_file)
    cold = _run(tmp_path)
    assert "onnxruntime" in cold or "sentence_transformers" in cold, "the cold run embeds"
    assert "torch" not in cold.split(":")[1].split(","), "the simulator answers untrained requests without torch"
    assert _run(tmp_path) == "loaded:", "the rerun found every call, embedding and fit in the cache"
