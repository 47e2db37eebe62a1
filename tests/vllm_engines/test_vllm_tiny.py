"""apm-tiny on a real vLLM engine (its CPU build here): the alias loads the shipped folder with
its vLLM options, and the model follows instructions there as it does on hf; served by vLLM's
OpenAI-compatible server under its alias, the openai backend reaches the same model."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from local_server import free_port, start, stop, wait_until_serving

from apm_bench.tiny.build import bundled_folder

from apm_bench.tiny.behaviour import BehaviourConfig, behaviour_report


def _instruction_row(backend: str, options: dict, out: Path) -> pd.Series:
    behaviour_report("apm-tiny", backend, options, BehaviourConfig(prompts_per_principle=4), out)
    summary = pd.read_csv(out / "behaviour.csv")
    return summary[(summary["probe"] == "instruction") & (summary["model"] == "apm-tiny")
                   & (summary["principle"] == "all")].iloc[0]


def test_apm_tiny_follows_instructions_on_vllm(tmp_path: Path) -> None:
    row = _instruction_row("vllm", {}, tmp_path)
    # on hf, 20 prompts per principle: see the README's "What it learned"
    assert row["follow"] > row["none"] > row["avoid"] and row["gap"] > 2.5, row.to_dict()


def test_apm_tiny_served_by_vllms_api_server_answers_the_openai_backend(tmp_path: Path) -> None:
    """The README's served path: `--served-model-name apm-tiny`, and the alias asks for that name."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundled_folder()),
               "--served-model-name", "apm-tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "2048", "--no-enable-chunked-prefill"]
    log = tmp_path / "server.log"
    server = start(command, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(url, server, log, timeout=300)
        row = _instruction_row("openai", {"base_url": url}, tmp_path / "report")
    finally:
        stop(server)
    assert row["follow"] > row["none"] > row["avoid"] and row["gap"] > 2.5, row.to_dict()


def test_apm_tiny_judge_on_vllm_rates_as_it_does_on_hf_and_agrees_with_sim_judge() -> None:
    """The judge alias on vLLM, with weighted scores read from vLLM's logprobs: the same model as on
    hf (same weights, float32), so the same ratings up to kernel rounding, and sim-judge's order."""
    from apm_bench.backends import load_backend
    from apm_bench.judging.agreement import agreement_summary, rated_pairs
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
    from apm_bench.judging.sim_judge import SimJudge
    from apm_bench.tiny.corpus import default_catalog, held_out_prompts

    catalog = default_catalog()
    writer = load_backend("sim-large", catalog)

    def pairs(backend: str) -> pd.DataFrame:
        engine = load_backend("apm-tiny-judge", catalog, backend=backend)
        try:
            judge = LLMJudge(engine, catalog.principles, LLMJudgeConfig(weighted=True))
            return rated_pairs(catalog, held_out_prompts()[1], writer, judge, SimJudge(catalog.principles), 60, seed=5)
        finally:
            engine.close()

    on_vllm, on_hf = pairs("vllm"), pairs("hf")
    summary = agreement_summary(on_vllm)
    assert summary["failed"] == 0 and summary["pearson"] > 0.25, summary
    assert on_vllm["judge"].corr(on_hf["judge"]) > 0.97
    assert (on_vllm["judge"] - on_hf["judge"]).abs().max() < 0.5
