"""What the LLM judge is shown: apm-bench's rubric prompt, or the APM authors' prompt.

`rubric` (the default) gives the principle's name, description and rubric on a 1–10 scale: a
small or non-reasoning judge rates more consistently when told what each principle means.
`paper` is the authors' prompt, for runs that reproduce their protocol: the conversation, the
response and the bare principle name on a 1–100 scale, with a system message that asks a
reasoning judge to think first (their judge templates in `src/llm_personalization/judge/`).

Both are read back by `parse_judge_messages`, which is how the simulated judge behind `apm
serve-sim` answers an LLM judge's requests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from apm_bench.backends.base import Message
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIN
from apm_bench.world.catalog import Principle
from apm_bench.world.prompting import bare_name

JudgePrompt = Literal["rubric", "paper"]

JUDGE_SYSTEM = (
    "You are an impartial expert evaluator of writing style. You rate ONLY how strongly an AI "
    "response exhibits one given principle, ignoring its correctness, helpfulness and every other "
    f"quality. Use a scale from {SCORE_MIN} (clearly exhibits the opposite of the principle) to "
    f"{SCORE_MAX} (a perfect example of the principle). Answer with the number only."
)

#: the authors' wording, kept verbatim: the protocol's judge must see what theirs saw
PAPER_SYSTEM_THINKING = (
    "\nYou are an expert, impartial evaluator. Your ONLY task is to rate how strongly the text exhibits the "
    "specific principle provided. IGNORE all other qualities of the text.\n\nOutput a score on a scale from 1 "
    "(the response clearly exhibits the OPPOSITE of the principle) to 100 (the response is a perfect example of "
    "the principle).\n\nFirst, use your internal thinking process to reason through the evaluation step-by-step. "
    "Once your reasoning is complete, your final visible output must be ONLY the numeric score (1-100), with "
    "absolutely no other words, punctuation, or text.\n"
)
PAPER_SYSTEM = (
    "\nYou are an expert, impartial evaluator. Your ONLY task is to rate how strongly the text exhibits the "
    "specific attribute provided. IGNORE all other qualities of the text.\n\nOutput a score on a scale from 1 "
    "(the response clearly exhibits the OPPOSITE of the attribute) to 100 (the response is a perfect example of "
    "the attribute).\n\nOutput only the score, no other text.\n"
)
PAPER_USER = (
    "\nPlease evaluate how well the AI response adheres to the provided attribute.\n\n<conversation>\n"
    "{conversation}\n</conversation>\n<ai_response_to_evaluate>\n{response}\n</ai_response_to_evaluate>\n"
    "<attribute>\n{attribute}\n</attribute>\n\nTo what extent does the response satisfy this attribute?\n"
    "Your evaluation (1-100):"
)

_PRINCIPLE = re.compile(r"<principle name=\"(?P<name>[^\"]+)\">")
_RESPONSE = re.compile(r"<response>\n(?P<response>.*)\n</response>", re.DOTALL)
_PROMPT = re.compile(r"<user_message>\n(?P<prompt>.*?)\n</user_message>", re.DOTALL)
_PAPER_ATTRIBUTE = re.compile(r"<attribute>\n(?P<name>.*?)\n</attribute>", re.DOTALL)
_PAPER_RESPONSE = re.compile(r"<ai_response_to_evaluate>\n(?P<response>.*)\n</ai_response_to_evaluate>", re.DOTALL)
_PAPER_PROMPT = re.compile(r"<message role='user'>(?P<prompt>.*?)</message>", re.DOTALL)


def judge_messages(
    principle: Principle, prompt: str, response: str, style: JudgePrompt = "rubric", thinking: bool = False
) -> tuple[Message, ...]:
    if style == "paper":
        return paper_judge_messages(principle, prompt, response, thinking)
    user = (
        f"<principle name=\"{principle.id}\">\n{principle.name}: {principle.description}\n"
        f"Rubric:\n{principle.rubric.strip()}\n</principle>\n\n"
        f"<user_message>\n{prompt}\n</user_message>\n\n<response>\n{response}\n</response>\n\n"
        f"How strongly does the response exhibit the principle? Your rating ({SCORE_MIN}-{SCORE_MAX}):"
    )
    return (Message("system", JUDGE_SYSTEM), Message("user", user))


def paper_judge_messages(principle: Principle, prompt: str, response: str, thinking: bool) -> tuple[Message, ...]:
    """The conversation before the response (here the one user prompt) as the authors format it."""
    conversation = f"<message role='user'>{prompt}</message>\n"
    user = PAPER_USER.format(conversation=conversation, response=response, attribute=bare_name(principle))
    return (Message("system", PAPER_SYSTEM_THINKING if thinking else PAPER_SYSTEM), Message("user", user))


def parse_judge_messages(messages: Sequence[Message]) -> tuple[str, str, str] | None:
    """(principle id — or, from the authors' prompt, its name —, user prompt, response) from a
    judge prompt; how a simulated judge reads it."""
    text = "\n".join(m.content for m in messages if m.role == "user")
    principle, prompt, response = _PRINCIPLE.search(text), _PROMPT.search(text), _RESPONSE.search(text)
    if principle and prompt and response:
        return principle.group("name"), prompt.group("prompt"), response.group("response")
    attribute, prompt, response = _PAPER_ATTRIBUTE.search(text), _PAPER_PROMPT.search(text), _PAPER_RESPONSE.search(text)
    if attribute and prompt and response:
        return attribute.group("name"), prompt.group("prompt"), response.group("response")
    return None
