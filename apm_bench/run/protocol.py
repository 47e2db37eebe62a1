"""Protocols: named sets of run options. `--protocol paper` is the APM authors' protocol, read from
their public code (philippspohn/llm-personalization-v4, branch rag_test); docs/protocol.md lists
each setting with the paper's value, apm-bench's default, and why they differ.

A protocol fills only the options a run leaves unset (from its config file or the command line),
so any setting can still be varied on top of it, e.g. the paper's ablations `--history-len 4`.
"""

from __future__ import annotations

from typing import Any, Literal

Protocol = Literal["apm-bench", "paper"]

#: the authors' sizes: 4 000 training and 500 validation users from their training file, and their
#: 1 000 test users
PAPER_USERS = 5_500
PAPER_TEST_USERS = 1_000
PAPER_VALIDATION_USERS = 500

PROTOCOLS: dict[str, dict[str, Any]] = {
    "apm-bench": {},
    "paper": {
        # judge: their prompt (bare principle name), 1–100 divided by 10, a reasoning judge sampled at
        # T = 1, top_p 0.95 with 4 096 tokens, the last number in range, 3 attempts, forced answers
        # continued after "</think>\n\nRating: "
        "judge_prompt": "paper",
        "judge_scale": 100,
        "judge_parse": "lenient",
        "judge_temperature": 1.0,
        "judge_top_p": 0.95,
        "judge_max_tokens": 4096,
        "judge_retries": 2,
        "judge_forced_answer": "continue",
        "judge_reasoning_effort": "medium",
        # the paper's oracle (a perfect router over each test user's own candidates) is the bound of gain
        "gain_against": "oracle-router",
        # the authors' routing/candidate instruction and RAG prompt
        "instruction_texts": "paper",
        # histories: the authors' rewrite prompt (bare attribute names as VERY / NOT AT ALL), a
        # thinking writer at T = 1 with 8 192 tokens; two past conversations (1 and 4: ablations)
        "writer_prompt": "paper",
        "writer_temperature": 1.0,
        "writer_max_tokens": 8192,
        "writer_discard_truncated": True,
        "history_len": 2,
        # test responses: 2 048 tokens at T = 1
        "max_tokens": 2048,
        "temperature": 1.0,
        # sizes: 10 worlds in the main grid (5 in the ablations)
        "worlds": list(range(10)),
        "users": PAPER_USERS,
        "test_fraction": PAPER_TEST_USERS / PAPER_USERS,
        "validation_fraction": PAPER_VALIDATION_USERS / PAPER_USERS,
        # test users' conversations from prompts no training user sees (their UltraChat test_sft)
        "disjoint_test_prompts": True,
        # one split for all worlds, as their files fix it, and one baseline response per test user,
        # generated and judged once and reused by every world
        "split_per_world": False,
        "shared_baseline": True,
        # mapping: one signed permutation; dense worlds keep the n_attr largest |r| (below)
        "n_perm": 1,
    },
}


def apply_protocol(data: dict[str, Any]) -> dict[str, Any]:
    """The run options with the protocol's values filled in where the run left them unset."""
    name = data.get("protocol") or "apm-bench"
    if name not in PROTOCOLS:
        return data  # the config's own validation names the valid protocols
    filled = {**PROTOCOLS[name], **data}
    if name == "paper" and filled.get("max_targets") is None:
        filled["max_targets"] = filled.get("n_attr", 1)  # the authors pass max_attributes = n_attr
    return filled


def paper_judge_config() -> Any:
    """The LLM judge's settings under the paper's protocol."""
    from apm_bench.judging.llm_judge import LLMJudgeConfig

    values = PROTOCOLS["paper"]
    return LLMJudgeConfig(prompt=values["judge_prompt"], scale=values["judge_scale"], parse=values["judge_parse"],
                          temperature=values["judge_temperature"], top_p=values["judge_top_p"],
                          max_tokens=values["judge_max_tokens"], retries=values["judge_retries"],
                          forced_answer=values["judge_forced_answer"],
                          reasoning_effort=values["judge_reasoning_effort"])
