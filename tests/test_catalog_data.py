"""Catalogs, prompt files, the reference importer and the simulated population (data layer)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from apm_bench.errors import CatalogError, ConfigError, PromptFileError
from apm_bench.sim.writer import SimHistoryWriter, SimWriterConfig
from apm_bench.world.catalog import POOL_SIZES, Catalog, load_catalog
from apm_bench.world.histories import build_population, import_reference_conversations
from apm_bench.world.prompts import load_prompts
from apm_bench.world.users import AttributeSetting, draw_attribute_settings

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FILE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "apm-examples.jsonl"

PAPER_PRINCIPLES = [
    "emotionally_neutral",
    "casual",
    "elaborate",
    "acknowledges_uncertainty",
    "prescriptive",
    "assumes_no_prior_knowledge",
    "gentle",
    "persuasive",
    "presents_multiple_perspectives",
    "collaborative",
]
PAPER_ATTRIBUTES = [
    "verbose",
    "enthusiastic",
    "open_ended",
    "tech_savvy",
    "highly_constrained",
    "anxious",
    "transactional",
    "hypothetical",
    "unpolished",
    "prescriptive",
]
# principles and attributes beyond the default pool, used by the authors' pools 2..8 only
EXTRA_PRINCIPLES = ["teacher_to_student_tone", "peer_to_peer_tone", "concrete", "conversational", "calming", "verbose"]
EXTRA_ATTRIBUTES = ["conversational", "neutral", "professional", "open_minded", "fact_seeking", "articulate"]
# the authors' pools (llm-personalization-v4, data/attribute_selection/*_k<k>.yaml), in their order
AUTHORS_POOLS = {
    2: (["emotionally_neutral", "teacher_to_student_tone"], ["conversational", "neutral"]),
    4: (["emotionally_neutral", "peer_to_peer_tone", "elaborate", "concrete"],
        ["verbose", "professional", "open_minded", "unpolished"]),
    6: (["emotionally_neutral", "conversational", "elaborate", "acknowledges_uncertainty", "prescriptive", "concrete"],
        ["verbose", "enthusiastic", "open_ended", "fact_seeking", "articulate", "anxious"]),
    8: (["emotionally_neutral", "conversational", "verbose", "acknowledges_uncertainty", "prescriptive", "concrete",
         "calming", "persuasive"],
        ["verbose", "enthusiastic", "open_ended", "articulate", "transactional", "anxious", "prescriptive", "tech_savvy"]),
    10: (PAPER_PRINCIPLES, PAPER_ATTRIBUTES),
}
ANTONYM_PAIRS = [
    ("verbose", "terse"),
    ("formal", "casual"),
    ("warm", "cold"),
    ("serious", "playful"),
    ("objective", "subjective"),
    ("structured", "unstructured"),
]


@pytest.fixture(scope="module")
def full_catalog() -> Catalog:
    """Everything the shipped folders hold, the entries of the smaller pools included."""
    return load_catalog()


@pytest.fixture(scope="module")
def catalog(full_catalog: Catalog) -> Catalog:
    """The default pool: what a default run uses."""
    return full_catalog.default_pool()


@pytest.fixture(scope="module")
def prompts():
    return load_prompts()


# --------------------------------------------------------------------------- shipped catalog


def test_shipped_principles_in_paper_order(catalog: Catalog, full_catalog: Catalog) -> None:
    assert catalog.principle_ids == PAPER_PRINCIPLES
    assert full_catalog.principle_ids == PAPER_PRINCIPLES + EXTRA_PRINCIPLES
    for principle in full_catalog.principles:
        assert principle.description.strip(), principle.id
        assert principle.rubric.strip(), principle.id
        assert principle.follow_instruction.strip() and principle.avoid_instruction.strip()
        assert principle.follow_instruction != principle.avoid_instruction
        assert principle.instruction("follow") == principle.follow_instruction
        assert principle.instruction("avoid") == principle.avoid_instruction


def test_shipped_antonyms(catalog: Catalog) -> None:
    assert catalog.antonyms is not None
    assert [tuple(pair) for pair in catalog.antonyms.pairs] == ANTONYM_PAIRS
    for pair in ANTONYM_PAIRS:
        for word in pair:
            assert catalog.antonyms.descriptions[word].strip()


def test_shipped_attributes_and_seeds(catalog: Catalog, full_catalog: Catalog) -> None:
    assert catalog.attribute_ids == PAPER_ATTRIBUTES
    assert full_catalog.attribute_ids == PAPER_ATTRIBUTES + EXTRA_ATTRIBUTES
    for attribute in full_catalog.attributes:
        for side in ("follow", "avoid"):
            bank = attribute.side(side)
            assert bank.description.strip()
            assert len(bank.phrases) >= 15, (attribute.id, side, len(bank.phrases))
            assert all(phrase.strip() for phrase in bank.phrases)
        assert set(attribute.stereotype) <= set(PAPER_PRINCIPLES + EXTRA_PRINCIPLES)
    for attribute in catalog.attributes:
        assert set(attribute.stereotype) <= set(PAPER_PRINCIPLES)
    assert len(catalog.seeds) >= 50
    assert len({seed.name for seed in catalog.seeds}) == len(catalog.seeds)


def test_lookup_by_id(catalog: Catalog) -> None:
    assert catalog.principle("gentle").id == "gentle"
    assert catalog.attribute("anxious").id == "anxious"
    with pytest.raises(CatalogError, match="no_such_principle"):
        catalog.principle("no_such_principle")


# --------------------------------------------------------------------------- pools


@pytest.mark.parametrize("k", [2, 4, 6, 8, 10])
def test_the_shipped_pools_are_the_authors(full_catalog: Catalog, k: int) -> None:
    principles, attributes = AUTHORS_POOLS[k]
    pool = full_catalog.with_pool(k)
    assert pool.principle_ids == principles
    assert pool.attribute_ids == attributes
    for small in pool.attributes:
        full = full_catalog.attribute(small.id)
        assert small.follow == full.follow and small.avoid == full.avoid
        assert small.stereotype == {p: w for p, w in full.stereotype.items() if p in principles}
        assert small.stereotype, f"{small.id} has no stereotype on pool {k}: the prior would ignore it"
    assert pool.seeds == full_catalog.seeds and pool.antonyms == full_catalog.antonyms
    # a narrowed catalog keeps no pools, and the full one is not narrowed as a side effect
    assert pool.principle_pools == {} and pool.attribute_pools == {}
    assert len(full_catalog.principles) == 16


def test_pool_10_is_exactly_the_ten_entry_catalog(full_catalog: Catalog, catalog_copy: tuple[Path, Path]) -> None:
    """A default run must not see the added entries: pool 10 equals a catalog of the first ten
    entries of each file, without pools.yaml (entries, order, stereotypes and the dump alike)."""
    principles, personas = catalog_copy
    _edit_yaml(principles / "principles.yaml", lambda d: d.update(principles=d["principles"][:10]))
    _edit_yaml(personas / "attributes.yaml", lambda d: d.update(attributes=[
        {**a, "stereotype": {p: w for p, w in a["stereotype"].items() if p in PAPER_PRINCIPLES}}
        for a in d["attributes"][:10]]))
    (principles / "pools.yaml").unlink()
    (personas / "pools.yaml").unlink()
    ten = load_catalog(principles, personas)
    assert full_catalog.with_pool(10) == ten.with_pool(10) == ten
    assert full_catalog.default_pool().model_dump() == ten.model_dump()
    assert full_catalog.largest_pool == 10


@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_pool_sizes_without_a_named_pool_are_prefixes_of_the_largest(full_catalog: Catalog, k: int) -> None:
    pool = full_catalog.with_pool(k)
    assert pool.principle_ids == PAPER_PRINCIPLES[:k]
    assert pool.attribute_ids == PAPER_ATTRIBUTES[:k]


@pytest.mark.parametrize("k", [2, 4, 6, 8, 10])
def test_within_a_pool_every_keyword_and_summary_word_names_one_principle(full_catalog: Catalog, k: int) -> None:
    """The simulator reads preference talk through keywords; one shared by two principles of a pool
    would push both, and the summarizer's statements use each principle's first keyword."""
    pool = full_catalog.with_pool(k)
    words = [w.lower() for p in pool.principles for w in [*p.keywords, *p.opposite_keywords]]
    assert len(words) == len(set(words)), Counter(words).most_common(3)
    assert len({p.keywords[0] for p in pool.principles}) == k
    assert len({p.name.lower() for p in pool.principles}) == k


@pytest.mark.parametrize("k", [2, 4, 6, 8, 10])
def test_without_pools_a_catalog_uses_prefixes(catalog: Catalog, k: int) -> None:
    assert k in POOL_SIZES
    pool = catalog.with_pool(k)
    assert pool.principle_ids == PAPER_PRINCIPLES[:k]
    assert pool.attribute_ids == PAPER_ATTRIBUTES[:k]
    kept = set(pool.principle_ids)
    for small, full in zip(pool.attributes, catalog.attributes):
        assert small.id == full.id
        assert small.follow == full.follow and small.avoid == full.avoid
        assert set(small.stereotype) <= kept
        assert small.stereotype == {p: w for p, w in full.stereotype.items() if p in kept}
    assert pool.seeds == catalog.seeds
    # the catalog is not narrowed as a side effect
    assert len(catalog.principles) == 10


def test_a_custom_catalog_without_pools_offers_every_prefix(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy
    (principles / "pools.yaml").unlink()
    (personas / "pools.yaml").unlink()
    custom = load_catalog(principles, personas)
    assert custom.pool_sizes == [] and custom.largest_pool == 16
    assert custom.with_pool(12).principle_ids == PAPER_PRINCIPLES + EXTRA_PRINCIPLES[:2]
    assert custom.with_pool(2).attribute_ids == PAPER_ATTRIBUTES[:2]


def test_with_pool_actually_drops_stereotype_entries(catalog: Catalog, full_catalog: Catalog) -> None:
    # verbose keeps only its weight on 'elaborate' in the authors' pool 4
    assert full_catalog.with_pool(4).attribute("verbose").stereotype == {"elaborate": 0.8}

    pool = catalog.with_pool(2)
    # verbose: {elaborate: 0.8, casual: -0.2} -> only 'casual' survives in the k=2 pool
    assert "elaborate" in catalog.attribute("verbose").stereotype
    assert pool.attribute("verbose").stereotype == {"casual": catalog.attribute("verbose").stereotype["casual"]}


@pytest.mark.parametrize("k", [0, -1, 11, 100])
def test_with_pool_out_of_range(catalog: Catalog, full_catalog: Catalog, k: int) -> None:
    for source in (catalog, full_catalog):  # the six added entries never make pool 11 or 12
        with pytest.raises(CatalogError, match="out of range") as info:
            source.with_pool(k)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- malformed catalogs


@pytest.fixture()
def catalog_copy(tmp_path: Path) -> tuple[Path, Path]:
    principles = tmp_path / "principles"
    personas = tmp_path / "personas"
    shutil.copytree(ROOT / "principles", principles)
    shutil.copytree(ROOT / "personas", personas)
    return principles, personas


def _edit_yaml(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _load_error(principles: Path, personas: Path) -> str:
    with pytest.raises(CatalogError) as info:
        load_catalog(principles, personas)
    message = str(info.value)
    assert message.strip()
    assert "\n" not in message, message
    # tmp_path carries the test's name; hide it so content checks cannot match the folder name
    return message.replace(str(principles.parent), "<root>")


def test_copied_catalog_loads(catalog_copy: tuple[Path, Path], full_catalog: Catalog) -> None:
    copy = load_catalog(*catalog_copy)
    assert copy == full_catalog
    assert copy.principle_pools == full_catalog.principle_pools and copy.pool_sizes == [2, 4, 6, 8, 10]


@pytest.mark.parametrize(("folder", "edit", "expected"), [
    ("principles", lambda d: d["pools"][2].append("casual"), "pool 2 lists 3 ids, not 2"),
    ("principles", lambda d: d["pools"].update({4: ["casual", "casual", "gentle", "elaborate"]}), "duplicate id in pool 4"),
    ("personas", lambda d: d["pools"].update({2: ["verbose", "sarcastic"]}), "attribute pool 2 names unknown attributes ['sarcastic']"),
    ("principles", lambda d: d["pools"].update({0: []}), "pool size 0"),
    ("personas", lambda d: d.update(pools="nope"), "pools: Input should be a valid dictionary"),
])
def test_bad_pools_file(catalog_copy: tuple[Path, Path], folder: str, edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    principles, personas = catalog_copy
    _edit_yaml((principles if folder == "principles" else personas) / "pools.yaml", edit)
    assert expected in _load_error(principles, personas)


@pytest.mark.parametrize("file", ["principles/principles.yaml", "personas/attributes.yaml", "personas/seeds.yaml"])
def test_broken_yaml_names_file(catalog_copy: tuple[Path, Path], file: str) -> None:
    principles, personas = catalog_copy
    path = principles.parent / file
    path.write_text(path.read_text(encoding="utf-8") + "\n  - id: [unclosed, {bracket\n", encoding="utf-8")
    message = _load_error(principles, personas)
    assert f"<root>/{file}" in message
    assert "YAML" in message


def test_missing_rubric(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy
    _edit_yaml(principles / "principles.yaml", lambda d: d["principles"][3].pop("rubric"))
    message = _load_error(principles, personas)
    assert "rubric" in message
    assert "Field required" in message


def test_duplicate_marker(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy

    def edit(data: dict) -> None:
        first = data["principles"][0]["sim"]["follow_markers"][0]
        data["principles"][5]["sim"]["avoid_markers"].append(first)

    _edit_yaml(principles / "principles.yaml", edit)
    message = _load_error(principles, personas)
    assert "duplicate" in message and "marker" in message


def test_marker_contained_in_another(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy

    def edit(data: dict) -> None:
        long = data["principles"][0]["sim"]["follow_markers"][0]
        data["principles"][2]["sim"]["follow_markers"].append(long[: len(long) // 2])

    _edit_yaml(principles / "principles.yaml", edit)
    message = _load_error(principles, personas)
    assert "contained in" in message and "marker" in message


def test_phrase_contained_in_another(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy

    def edit(data: dict) -> None:
        long = data["attributes"][0]["follow"]["phrases"][0]
        data["attributes"][4]["avoid"]["phrases"].append(long[:20])

    _edit_yaml(personas / "attributes.yaml", edit)
    message = _load_error(principles, personas)
    assert "contained in" in message and "phrase" in message


def test_stereotype_unknown_principle(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy
    _edit_yaml(personas / "attributes.yaml", lambda d: d["attributes"][1]["stereotype"].update(sarcastic=0.5))
    message = _load_error(principles, personas)
    assert "sarcastic" in message and "enthusiastic" in message


def test_stereotype_weight_out_of_range(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy
    _edit_yaml(personas / "attributes.yaml", lambda d: d["attributes"][0]["stereotype"].update(elaborate=1.5))
    message = _load_error(principles, personas)
    assert "stereotype" in message and "[-1, 1]" in message


def test_unknown_field_rejected(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy
    _edit_yaml(principles / "principles.yaml", lambda d: d["principles"][0].update(rubrik="typo"))
    assert "rubrik" in _load_error(principles, personas)


@pytest.mark.parametrize("which", ["principles", "personas"])
def test_missing_folder(catalog_copy: tuple[Path, Path], which: str) -> None:
    principles, personas = catalog_copy
    missing = principles.parent / "does-not-exist"
    args = (missing, personas) if which == "principles" else (principles, missing)
    message = _load_error(*args)
    assert "<root>/does-not-exist" in message


def test_missing_principles_file(catalog_copy: tuple[Path, Path]) -> None:
    principles, personas = catalog_copy
    (principles / "principles.yaml").unlink()
    assert "not found: <root>/principles/principles.yaml" in _load_error(principles, personas)


# --------------------------------------------------------------------------- prompts


def test_shipped_prompts(prompts) -> None:  # type: ignore[no-untyped-def]
    assert len(prompts) >= 300
    categories = Counter(p.category for p in prompts)
    assert len(categories) >= 6
    assert "uncategorized" not in categories
    ids = [p.id for p in prompts]
    assert len(set(ids)) == len(ids)
    assert all(p.text.strip() for p in prompts)
    assert len({p.text for p in prompts}) == len(prompts)


def test_load_prompts_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": "a", "category": "x", "text": "First request?"},
        {"text": "Second request without id or category.", "extra": 3},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    loaded = load_prompts(path)
    assert [p.text for p in loaded] == ["First request?", "Second request without id or category."]
    assert loaded[0].id == "a" and loaded[0].category == "x"
    assert loaded[1].id == "mine-00002" and loaded[1].category == "uncategorized"


def test_load_prompts_parquet(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "mine.parquet"
    pd.DataFrame({"id": [10, 11, 12], "category": ["a", "b", "a"], "text": ["one?", "two?", "three?"]}).to_parquet(path)
    loaded = load_prompts(path)
    assert [p.text for p in loaded] == ["one?", "two?", "three?"]
    assert [p.id for p in loaded] == ["10", "11", "12"]
    assert [p.category for p in loaded] == ["a", "b", "a"]

    only_text = tmp_path / "plain.parquet"
    pd.DataFrame({"text": ["alpha", "beta"]}).to_parquet(only_text)
    assert [p.id for p in load_prompts(only_text)] == ["plain-00001", "plain-00002"]


def _prompt_error(path: Path) -> str:
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message.replace(str(path.parent), "<dir>")


def test_prompt_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert "not found: <dir>/nope.jsonl" in _prompt_error(path)


def test_prompt_file_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops\n', encoding="utf-8")
    assert "line 2" in _prompt_error(path)


def test_prompt_file_row_without_text(tmp_path: Path) -> None:
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "fine"}\n{"id": "q", "prompt": "wrong key"}\n', encoding="utf-8")
    assert "row 2" in _prompt_error(path)


def test_prompt_file_empty_text_and_duplicates(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n', encoding="utf-8")
    assert "empty" in _prompt_error(empty)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', encoding="utf-8")
    assert "unique" in _prompt_error(dup)


def test_parquet_without_text_column(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "cols.parquet"
    pd.DataFrame({"prompt": ["one", "two"]}).to_parquet(path)
    assert "'text' column" in _prompt_error(path)


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"definitely not parquet")
    _prompt_error(path)


# --------------------------------------------------------------------------- reference importer


@pytest.fixture(scope="module")
def reference_file() -> Path:
    if not REFERENCE_FILE.is_file():
        pytest.skip("../shared/reference is not beside the project checkout")
    return REFERENCE_FILE


def _raw_reference(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _first_user(conversation: dict) -> str:
    return next(m["content"] for m in conversation["messages"] if m["role"] == "user")


def test_import_reference(reference_file: Path, catalog: Catalog) -> None:
    raw = _raw_reference(reference_file)
    population = import_reference_conversations(reference_file, catalog)
    assert len(population.users) == 10 == len(raw)
    assert len({u.id for u in population.users}) == 10
    by_idx = {r["user_idx"]: r for r in raw}
    assert by_idx[1]["rewrite_style_attributes"][0]["attribute"] == "highly constrained"
    user1 = next(u for u in population.users if u.id.endswith("00001"))
    assert user1.attributes == [AttributeSetting(attribute="highly_constrained", side="follow")]
    user2 = next(u for u in population.users if u.id.endswith("00002"))
    assert user2.attributes == [AttributeSetting(attribute="tech_savvy", side="follow")]
    for user, record in zip(population.users, raw):
        assert user.id == f"ref{record['user_idx']:05d}"
        assert [(s.attribute, s.side) for s in user.attributes] == [
            (s["attribute"].replace(" ", "_").replace("-", "_"), s["side"]) for s in record["rewrite_style_attributes"]
        ]
        assert all(s.attribute in catalog.attribute_ids for s in user.attributes)
        conversations = record["conversations"]
        assert len(conversations) == 20
        assert user.history == [_first_user(c) for c in conversations[:19]]
        assert user.prompt == _first_user(conversations[19])
        assert user.prompt not in user.history


def test_import_reference_history_len(reference_file: Path, catalog: Catalog) -> None:
    raw = _raw_reference(reference_file)
    population = import_reference_conversations(reference_file, catalog, history_len=2)
    for user, record in zip(population.users, raw):
        assert user.history == [_first_user(c) for c in record["conversations"][:2]]
        assert user.prompt == _first_user(record["conversations"][-1])


def test_import_reference_unknown_attribute(reference_file: Path, catalog: Catalog, tmp_path: Path) -> None:
    record = _raw_reference(reference_file)[0]
    record["rewrite_style_attributes"] = [{"attribute": "sarcastic", "side": "follow"}]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="sarcastic") as info:
        import_reference_conversations(path, catalog)
    assert "\n" not in str(info.value)


def test_import_reference_malformed(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"user_idx": 0, "rewrite_style_attributes": [], "conversations": []}\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match="line 1"):
        import_reference_conversations(path, catalog)
    with pytest.raises(PromptFileError):
        import_reference_conversations(tmp_path / "absent.jsonl", catalog)


# --------------------------------------------------------------------------- simulated population


class RecordingWriter:
    """Delegates to SimHistoryWriter and remembers which neutral texts each user was given."""

    def __init__(self, inner: SimHistoryWriter) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    def rewrite(self, texts, attributes, persona, rng):  # type: ignore[no-untyped-def]
        self.calls.append(list(texts))
        return self.inner.rewrite(texts, attributes, persona, rng)


def _population(catalog, prompts, seed, writer=None, n_users=40, n_attr=1, history_len=6):  # type: ignore[no-untyped-def]
    writer = writer or SimHistoryWriter(catalog)
    return build_population(catalog, prompts, writer, n_users=n_users, n_attr=n_attr, history_len=history_len, seed=seed)


def test_population_deterministic(catalog: Catalog, prompts) -> None:  # type: ignore[no-untyped-def]
    a = _population(catalog, prompts, seed=7)
    b = _population(catalog, prompts, seed=7)
    c = _population(catalog, prompts, seed=8)
    assert a == b
    assert [u.history for u in a.users] != [u.history for u in c.users]
    assert [u.prompt_id for u in a.users] != [u.prompt_id for u in c.users]


@pytest.mark.parametrize("n_attr", [1, 2])
def test_population_structure(catalog: Catalog, prompts, n_attr: int) -> None:  # type: ignore[no-untyped-def]
    history_len = 6
    recorder = RecordingWriter(SimHistoryWriter(catalog))
    population = _population(catalog, prompts, seed=3, writer=recorder, n_attr=n_attr, history_len=history_len)
    # the recorder does not change what is produced
    assert population == _population(catalog, prompts, seed=3, n_attr=n_attr, history_len=history_len)
    by_id = {p.id: p for p in prompts}
    texts = {p.text for p in prompts}
    assert len(recorder.calls) == len(population.users) == 40
    for user, neutral in zip(population.users, recorder.calls):
        assert len(user.history) == history_len
        assert len(user.attributes) == n_attr
        assert len(neutral) == history_len + 1
        assert len(set(neutral)) == history_len + 1  # distinct neutral prompts
        assert set(neutral) <= texts
        for message, text in zip([*user.history, user.prompt], neutral):
            assert text in message
        assert by_id[user.prompt_id].text == neutral[-1]
        assert by_id[user.prompt_id].text in user.prompt


def test_population_too_few_prompts(catalog: Catalog, prompts) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        _population(catalog, prompts[:5], seed=0, history_len=5)


def _phrase_owner(catalog: Catalog) -> dict[str, tuple[str, str]]:
    return {
        phrase: (attribute.id, side)
        for attribute in catalog.attributes
        for side in ("follow", "avoid")
        for phrase in attribute.side(side).phrases
    }


@pytest.mark.parametrize("n_attr", [1, 2])
def test_full_expression_no_leak(catalog: Catalog, prompts, n_attr: int) -> None:  # type: ignore[no-untyped-def]
    writer = SimHistoryWriter(catalog, SimWriterConfig(expression=1.0, leak=0.0))
    population = _population(catalog, prompts, seed=11, writer=writer, n_attr=n_attr)
    owners = _phrase_owner(catalog)
    for user in population.users:
        active = {(s.attribute, s.side) for s in user.attributes}
        for message in [*user.history, user.prompt]:
            shown = [owners[phrase] for phrase in owners if phrase in message]
            assert set(shown) <= active, (message, shown, active)
            # every active attribute shows (expression = 1), on its own side
            assert set(shown) == active


def test_leak_shows_inactive_attributes_on_random_sides(catalog: Catalog, prompts) -> None:  # type: ignore[no-untyped-def]
    writer = SimHistoryWriter(catalog, SimWriterConfig(expression=0.0, leak=1.0, persona_mention=0.0))
    population = _population(catalog, prompts, seed=13, writer=writer, n_users=20)
    owners = _phrase_owner(catalog)
    sides: Counter = Counter()
    for user in population.users:
        active = {s.attribute for s in user.attributes}
        for message in [*user.history, user.prompt]:
            shown = [owners[phrase] for phrase in owners if phrase in message]
            assert sorted(a for a, _ in shown) == sorted(set(catalog.attribute_ids) - active)
            sides.update(side for _, side in shown)
    assert 0.4 <= sides["follow"] / (sides["follow"] + sides["avoid"]) <= 0.6


def test_no_expression_keeps_request_verbatim(catalog: Catalog, prompts) -> None:  # type: ignore[no-untyped-def]
    writer = SimHistoryWriter(catalog, SimWriterConfig(expression=0.0, leak=0.0, persona_mention=0.0))
    recorder = RecordingWriter(writer)
    population = _population(catalog, prompts, seed=5, writer=recorder, n_users=10)
    for user, neutral in zip(population.users, recorder.calls):
        assert [*user.history, user.prompt] == neutral


def test_messages_never_state_answer_preference(catalog: Catalog, prompts) -> None:  # type: ignore[no-untyped-def]
    writer = SimHistoryWriter(catalog, SimWriterConfig(expression=1.0, leak=0.5, persona_mention=0.5))
    population = _population(catalog, prompts, seed=21, writer=writer, n_users=60, n_attr=2, history_len=10)
    instructions = [p.instruction(side) for p in catalog.principles for side in ("follow", "avoid")]
    marker = re.compile(r"\b(FOLLOW|AVOID)\b")
    messages = [m for u in population.users for m in [*u.history, u.prompt]]
    assert len(messages) == 60 * 11
    for message in messages:
        assert not marker.search(message), message
        for instruction in instructions:
            assert instruction not in message
    # the phrase banks themselves carry no instruction either
    for phrase in _phrase_owner(catalog):
        assert not marker.search(phrase)
        assert not any(instruction in phrase or phrase in instruction for instruction in instructions)


# --------------------------------------------------------------------------- attribute draws


def test_attribute_sides_balanced(catalog: Catalog) -> None:
    rng = np.random.default_rng(1234)
    draws = [draw_attribute_settings(catalog.attribute_ids, 1, rng)[0] for _ in range(4000)]
    follow_share = sum(s.side == "follow" for s in draws) / len(draws)
    assert 0.45 <= follow_share <= 0.55, follow_share
    counts = Counter(s.attribute for s in draws)
    assert set(counts) == set(catalog.attribute_ids)
    assert min(counts.values()) > 250  # expected 400 each


def test_two_attributes_distinct(catalog: Catalog) -> None:
    rng = np.random.default_rng(99)
    sides = []
    for _ in range(1000):
        settings = draw_attribute_settings(catalog.attribute_ids, 2, rng)
        assert len(settings) == 2
        assert settings[0].attribute != settings[1].attribute
        sides.extend(s.side for s in settings)
    assert 0.45 <= sides.count("follow") / len(sides) <= 0.55


@pytest.mark.parametrize("n_attr", [0, 11])
def test_n_attr_out_of_range(catalog: Catalog, n_attr: int) -> None:
    with pytest.raises(ConfigError):
        draw_attribute_settings(catalog.attribute_ids, n_attr, np.random.default_rng(0))


def _reference_record(user_idx: int, attribute: str, side: str, conversations: int = 3) -> dict:
    """A user in the authors' format (made up here, not taken from their data)."""
    return {"user_idx": user_idx, "rewrite_style_attributes": [{"attribute": attribute, "side": side}],
            "conversations": [{"conversation_id": f"c{user_idx}-{j}", "messages": [
                {"role": "user", "content": f"request {j} of user {user_idx} ({attribute}, {side})"},
                {"role": "assistant", "content": "an answer"}]} for j in range(conversations)]}


def _write_reference(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_authors_train_and_test_files_keep_their_split(catalog: Catalog, tmp_path: Path) -> None:
    from apm_bench.world.world import build_world

    attributes = [a.replace("_", " ") for a in catalog.attribute_ids]
    train = _write_reference(tmp_path / "train.jsonl", [_reference_record(i, attributes[i % 10], ("follow", "avoid")[i % 2])
                                                          for i in range(40)])
    test = _write_reference(tmp_path / "test.jsonl", [_reference_record(i, attributes[(i + 3) % 10], "avoid")
                                                        for i in range(10)])  # user_idx restarts at 0, as theirs do
    population = import_reference_conversations(train, catalog, history_len=2, test_path=test)
    assert len({u.id for u in population.users}) == 50  # no id shared between the files
    assert population.test_ids == [f"test-ref{i:05d}" for i in range(10)]
    for seed in (0, 1):
        world = build_world(population, catalog, seed, validation_fraction=0.1, split_seed=seed)
        assert set(world.split.test) == {u for u in population.test_ids if u in world.targets}
        assert not set(world.split.train + world.split.validation) & set(population.test_ids)
        assert len(world.split.validation) == 4  # a tenth of the training file
    with pytest.raises(PromptFileError, match="line 3 repeats user_idx 0 of line 1"):
        import_reference_conversations(
            _write_reference(tmp_path / "both.jsonl", [_reference_record(0, "verbose", "follow"),
                                                       _reference_record(1, "verbose", "avoid"),
                                                       _reference_record(0, "anxious", "follow")]), catalog)
