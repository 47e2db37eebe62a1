"""The texts methods put into the context: style instructions, history blocks, example blocks.

One place for them, because a real LLM and the simulator's reader must see the same conventions
(the reader recognises `FOLLOW <name>` / `AVOID <name>` and the example tags defined here).
"""

from __future__ import annotations

from typing import Literal

from apm_bench.world.catalog import Principle, Side

#: whose wording the instructions and the RAG prompt use: apm-bench's (each principle's own
#: instruction sentence from the catalog), or the APM authors' (one template for every principle)
InstructionTexts = Literal["apm-bench", "paper"]
SIDE_WORDS: dict[Side, str] = {"follow": "FOLLOW", "avoid": "AVOID"}
#: the authors' routing and candidate instruction, verbatim
PAPER_INSTRUCTION = (
    "\nYour task is to respond to the user's prompt while strictly adhering to the following response "
    "principle:\n{direction} {name}\n\nYou must {sentence}.\n"
)
PAPER_SENTENCES: dict[Side, str] = {"follow": "demonstrate strong {name} in your response",
                                    "avoid": "avoid any {name} in your response"}
#: the authors' RAG system prompt (their rag_simple method), verbatim
PAPER_RAG_SYSTEM = (
    "Below are examples of prompts and responses showing the response styles that users similar to the "
    "current user prefer (\"best\") and dislike (\"worst\"). Use these examples to infer the kind of response "
    "style this user wants, then respond accordingly.\n\n<examples>\n{examples}\n</examples>\n\nNow respond to "
    "the user's prompt in a style consistent with what they appear to prefer based on the examples above. Do not "
    "mention or refer to the examples.\n"
)
BEST_TAG = "best_response"
WORST_TAG = "worst_response"


def bare_name(principle: Principle) -> str:
    """The principle as the authors name it: its name alone, in lower case ("emotionally neutral")."""
    return principle.name.lower()


def style_instruction(principle: Principle, side: Side, texts: InstructionTexts = "apm-bench") -> str:
    """The system prompt that asks for one side of one principle (candidates, routing, oracle)."""
    if texts == "paper":
        return PAPER_INSTRUCTION.format(direction=SIDE_WORDS[side], name=bare_name(principle),
                                        sentence=paper_sentence(principle, side))
    return (
        "Respond to the user's message while strictly adhering to this response principle:\n"
        f"{SIDE_WORDS[side]} {principle.name}\n\n"
        f"{principle.instruction(side)}"
    )


def paper_sentence(principle: Principle, side: Side) -> str:
    return PAPER_SENTENCES[side].format(name=bare_name(principle))


def history_block(history: list[str]) -> str:
    """A user's past messages, one tagged block each (the reference implementation's layout)."""
    return "\n\n".join(f"<prompt>{message}</prompt>" for message in history)


def history_context(history: list[str]) -> str:
    return (
        "Below are earlier messages this user sent you. Answer their new message in the way this user "
        "would most likely prefer.\n\n" + history_block(history)
    )


def example_block(prompt: str, best: str, worst: str | None) -> str:
    """One retrieved example: a similar user's prompt with the responses they rated best and worst."""
    parts = [f"<example>\n<prompt>{prompt}</prompt>", f"<{BEST_TAG}>{best}</{BEST_TAG}>"]
    if worst is not None:
        parts.append(f"<{WORST_TAG}>{worst}</{WORST_TAG}>")
    return "\n".join(parts) + "\n</example>"


SUMMARIZE_INSTRUCTION = (
    "Read the earlier messages of a user below and write a short summary (one to three sentences) "
    "of how this user would like answers to be written. Reply with the summary only."
)


def summarize_messages(history: list[str]) -> tuple[str, str]:
    """(system, user) contents of the request that asks for a preference summary (POPI)."""
    return SUMMARIZE_INSTRUCTION, history_block(history) if history else "(no earlier messages)"


VIBE_INSTRUCTION = (
    "Below are messages one user has written. Describe this user in two or three sentences: how they "
    "write, what they seem to know and care about, and which kind of answers would suit them. Be concrete. "
    "Reply with the description only."
)

PREFERENCE_INSTRUCTION = (
    "Below is a request a user made, the answer they rated best and the answer they rated worst. In two or "
    "three sentences, say which style of answer this user prefers and which they dislike, judging by how "
    "the two answers differ in tone, length, structure, detail and wording. Describe the preference in "
    "general terms, without referring to the two answers. Reply with the description only."
)


def vibe_messages(history: list[str]) -> tuple[str, str]:
    """(system, user) contents of the request for a user's "vibe" description (rag-advanced's key)."""
    return VIBE_INSTRUCTION, history_block(history) if history else "(no earlier messages)"


def preference_messages(prompt: str, best: str, worst: str) -> tuple[str, str]:
    """(system, user) contents of the request for what a rated pair says about a user (rag-advanced's value)."""
    return PREFERENCE_INSTRUCTION, example_block(prompt, best, worst)


def preferences_context(preferences: list[str]) -> str:
    """rag-advanced's system prompt: what similar users prefer, never their histories or examples."""
    listed = "\n".join(f"- {p.strip()}" for p in preferences)
    return ("Users similar to this one have shown these preferences about how answers are written:\n"
            f"{listed}\nAnswer the user's message in the style these preferences describe, without mentioning them.")


def summary_context(summary: str) -> str:
    """The generator sees the summary only, never the history it came from."""
    return f"What we know about this user's preferences: {summary.strip()}\nAnswer their message accordingly."
