"""Reasoning models write their thinking before the answer; every role that reads an answer (the
judge, the history writer) must read the answer alone, and know when the budget ran out mid-thought.
"""

from __future__ import annotations

#: where a reasoning model's answer starts: gpt-oss through offline vLLM ("analysis…assistantfinal7"),
#: Qwen- and DeepSeek-style models ("<think>…</think>7")
_ANSWER_MARKERS = ("assistantfinal", "</think>")
_REASONING_OPENERS = ("<think>", "analysis")


def split_reasoning(text: str) -> tuple[str, bool]:
    """(the answer after any reasoning, whether the text stopped inside unfinished reasoning)."""
    for marker in _ANSWER_MARKERS:
        if marker in text:
            return text.rsplit(marker, 1)[1], False
    stripped = text.lstrip()
    return text, stripped.startswith(_REASONING_OPENERS)
