"""Histories: each user's past messages and the evaluation prompt of their held-out conversation.

A *population* is the users with their attributes and conversations. It does not depend on the
hidden mapping C, so one population serves every world seed (as in the paper, where the rewritten
conversations are generated once and C is redrawn per world).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from apm_bench.errors import ConfigError, PromptFileError, first_error
from apm_bench.world.catalog import Catalog, PersonaSeed
from apm_bench.world.prompts import NeutralPrompt, read_jsonl_objects
from apm_bench.world.users import AttributeSetting, draw_attribute_settings, draw_balanced_attribute_settings


class PopulationUser(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    attributes: list[AttributeSetting]
    persona: PersonaSeed | None = None
    history: list[str]
    prompt: str
    prompt_id: str


class Population(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    users: list[PopulationUser]
    #: users the data itself holds out for testing (the authors' separate test file); None: every
    #: world draws its test users from the whole population
    test_ids: list[str] | None = None
    #: users left out because the history writer failed on one of their messages
    discarded_users: int = 0


class HistoryWriter(Protocol):
    """Rewrites neutral requests so that they show a user's attributes, keeping the request itself."""

    def rewrite(
        self,
        texts: list[str],
        attributes: list[AttributeSetting],
        persona: PersonaSeed | None,
        rng: np.random.Generator,
    ) -> list[str] | None:
        """The rewrites in order, or None when any failed: that user is discarded, and counted."""
        ...


def build_population(
    catalog: Catalog,
    prompts: list[NeutralPrompt],
    writer: HistoryWriter,
    n_users: int,
    n_attr: int,
    history_len: int,
    seed: int,
    balanced: bool = True,
    test_prompts: list[NeutralPrompt] | None = None,
    test_users: int = 0,
) -> Population:
    """Each user gets history_len + 1 distinct neutral prompts; the last becomes the evaluation prompt.

    `balanced` draws the attribute settings of the whole population by design (see
    `draw_balanced_attribute_settings`); otherwise each user draws them independently. With
    `test_prompts`, the last `test_users` users are every world's test users and draw their
    conversations from those prompts only, a pool disjoint from everyone else's (as the authors'
    test users come from UltraChat's test split): no retrieved example can carry a test prompt.
    """
    conversations = history_len + 1
    for pool in (prompts, test_prompts or prompts):
        if conversations > len(pool):
            raise ConfigError(f"history_len {history_len} needs {conversations} prompts, the prompt set has {len(pool)}")
    first_test = n_users - test_users if test_prompts is not None else n_users
    rng = np.random.default_rng([seed, 0xA77])
    designed = draw_balanced_attribute_settings(catalog.attribute_ids, n_attr, n_users, rng) if balanced else None
    users = []
    discarded = 0
    for index in range(n_users):
        settings = designed[index] if designed else draw_attribute_settings(catalog.attribute_ids, n_attr, rng)
        persona = catalog.seeds[int(rng.integers(len(catalog.seeds)))] if catalog.seeds else None
        pool = test_prompts if test_prompts is not None and index >= first_test else prompts
        chosen = [pool[i] for i in rng.choice(len(pool), size=conversations, replace=False)]
        messages = writer.rewrite([p.text for p in chosen], settings, persona, rng)
        if messages is None:
            discarded += 1
            continue
        users.append(
            PopulationUser(
                id=f"u{index:05d}",
                attributes=settings,
                persona=persona,
                history=messages[:-1],
                prompt=messages[-1],
                prompt_id=chosen[-1].id,
            )
        )
    if not users:
        raise ConfigError(f"the history writer failed for all {n_users} users; no population to evaluate")
    test_ids = [u.id for u in users if int(u.id[1:]) >= first_test] if test_prompts is not None else None
    return Population(source=f"simulated(seed={seed}{'' if balanced else ', iid attributes'})", users=users,
                      discarded_users=discarded, test_ids=test_ids)


def keep_history(population: Population, history_len: int) -> Population:
    """Every user's first `history_len` past messages, the rest of the population as it is: users
    drawn once with long histories and cut, so shorter histories are prefixes of the same users'
    (same prompts, same evaluation prompt) and a history-length curve compares like with like."""
    users = [u.model_copy(update={"history": u.history[:history_len]}) for u in population.users]
    return population.model_copy(update={"users": users})


# --------------------------------------------------------------------------- reference format


class _ReferenceMessage(BaseModel):
    role: str
    content: str


class _ReferenceConversation(BaseModel):
    messages: list[_ReferenceMessage]


class _ReferenceUser(BaseModel):
    user_idx: int
    rewrite_style_attributes: list[AttributeSetting]
    conversations: list[_ReferenceConversation]


def attribute_id_from_name(name: str) -> str:
    """'highly constrained' / 'tech-savvy' in the reference data are 'highly_constrained' / 'tech_savvy' here."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _first_user_message(conversation: _ReferenceConversation) -> str:
    for message in conversation.messages:
        if message.role == "user":
            return message.content
    raise ValueError("a conversation has no user message")


def import_reference_conversations(
    path: Path, catalog: Catalog, history_len: int | None = None, test_path: Path | None = None
) -> Population:
    """Read the APM authors' conversation format (one user per JSONL line).

    History = first user message of every conversation but the last (the first history_len of
    them, as the authors take them); evaluation prompt = first user message of the last
    conversation. With `test_path` (the authors' test file) its users are the test users of every
    world and `path` holds the training and validation users: their `user_idx` both start at 0,
    so test users get ids of their own ("test-ref00012") and can never meet a training user's id.
    """
    users = _reference_users(Path(path), catalog, history_len, "ref")
    if test_path is None:
        return Population(source=f"reference({Path(path).name})", users=users)
    test_users = _reference_users(Path(test_path), catalog, history_len, "test-ref")
    return Population(source=f"reference({Path(path).name} + test {Path(test_path).name})", users=users + test_users,
                      test_ids=[u.id for u in test_users])


def _reference_users(path: Path, catalog: Catalog, history_len: int | None, prefix: str) -> list[PopulationUser]:
    if not path.is_file():
        raise PromptFileError(f"conversation file not found: {path}")
    known = set(catalog.attribute_ids)
    users: list[PopulationUser] = []
    seen: dict[int, int] = {}
    for number, row in read_jsonl_objects(path):
        try:
            record = _ReferenceUser.model_validate(row)
            history = [_first_user_message(c) for c in record.conversations[:-1]]
            prompt = _first_user_message(record.conversations[-1])
        except (ValidationError, ValueError, IndexError) as exc:
            raise PromptFileError(f"{path}: line {number} is not a reference-format user ({_short(exc)})") from None
        if record.user_idx in seen:
            raise PromptFileError(f"{path}: line {number} repeats user_idx {record.user_idx} of line "
                                  f"{seen[record.user_idx]}; every user must appear once (for the authors' train "
                                  "and test files, pass the test file as --test-conversations)")
        seen[record.user_idx] = number
        settings = [
            AttributeSetting(attribute=attribute_id_from_name(s.attribute), side=s.side)
            for s in record.rewrite_style_attributes
        ]
        unknown = [s.attribute for s in settings if s.attribute not in known]
        if unknown:
            raise PromptFileError(f"{path}: line {number} uses attributes not in the catalog: {unknown}")
        users.append(
            PopulationUser(
                id=f"{prefix}{record.user_idx:05d}",
                attributes=settings,
                history=history[:history_len] if history_len is not None else history,
                prompt=prompt,
                prompt_id=f"{prefix}{record.user_idx:05d}-last",
            )
        )
    if not users:
        raise PromptFileError(f"{path} holds no users")
    return users


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return first_error(exc)
    return str(exc).splitlines()[0]
