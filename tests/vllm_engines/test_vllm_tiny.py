"""apm-tiny on a real vLLM engine (its CPU build here): the alias loads the shipped folder with
its vLLM options, and the model follows instructions there as it does on hf."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from apm_bench.tiny.behaviour import BehaviourConfig, behaviour_report


def test_apm_tiny_follows_instructions_on_vllm(tmp_path: Path) -> None:
    behaviour_report("apm-tiny", "vllm", {}, BehaviourConfig(prompts_per_principle=4), tmp_path)
    summary = pd.read_csv(tmp_path / "behaviour.csv")
    row = summary[(summary["probe"] == "instruction") & (summary["model"] == "apm-tiny")
                  & (summary["principle"] == "all")].iloc[0]
    # on hf, 20 prompts per principle: FOLLOW 7.54, none 5.46, AVOID 3.19 (README)
    assert row["follow"] > row["none"] > row["avoid"] and row["gap"] > 2.5, row.to_dict()
