"""Catalogs: the response principles, the user attributes, the persona seeds and the pools.

Catalogs are data (YAML folders), validated here so that a typo in a user's own catalog fails
at load time with one clear line instead of deep inside a run.

A pool of size k is what a run uses: k principles and k attributes. A folder's optional
`pools.yaml` names them per k (the APM authors' pools are different sets for each k, chosen by
factor analysis, not prefixes of one list); for a k it does not name, the pool is a prefix of the
largest named pool, or of the file's own order where there is no `pools.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apm_bench.errors import CatalogError, first_error
from apm_bench.inputs import parse_yaml

Side = Literal["follow", "avoid"]
POOL_SIZES = (2, 4, 6, 8, 10)
POOLS_FILE = "pools.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrincipleMarkers(_Strict):
    """Sentences the simulator inserts to make a principle visible and its judge counts."""

    follow_markers: list[str] = Field(min_length=3)
    avoid_markers: list[str] = Field(min_length=3)


class Principle(_Strict):
    id: str
    name: str
    description: str
    rubric: str
    follow_instruction: str
    avoid_instruction: str
    keywords: list[str] = Field(min_length=1)
    opposite_keywords: list[str] = Field(default_factory=list)
    sim: PrincipleMarkers

    def instruction(self, side: Side) -> str:
        return self.follow_instruction if side == "follow" else self.avoid_instruction

    def markers(self, side: Side) -> list[str]:
        return self.sim.follow_markers if side == "follow" else self.sim.avoid_markers


class AttributeSide(_Strict):
    description: str
    phrases: list[str] = Field(min_length=3)


class Attribute(_Strict):
    id: str
    name: str
    follow: AttributeSide
    avoid: AttributeSide
    stereotype: dict[str, float] = Field(default_factory=dict)

    def side(self, side: Side) -> AttributeSide:
        return self.follow if side == "follow" else self.avoid

    @field_validator("stereotype")
    @classmethod
    def _weights_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if not -1.0 <= weight <= 1.0:
                raise ValueError(f"stereotype weight for {key!r} must lie in [-1, 1], got {weight}")
        return value


class PersonaSeed(_Strict):
    name: str
    occupation: str
    interests: list[str] = Field(min_length=1)


class AntonymCatalog(_Strict):
    pairs: list[tuple[str, str]] = Field(min_length=1)
    descriptions: dict[str, str]
    #: word → (principle id, side) through which the simulator's judge rates the word
    sim_proxies: dict[str, tuple[str, Side]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _every_word_described(self) -> "AntonymCatalog":
        missing = [w for pair in self.pairs for w in pair if w not in self.descriptions]
        if missing:
            raise ValueError(f"antonym words without a description: {missing}")
        return self


class PoolFile(_Strict):
    """`pools.yaml` of a catalog folder: k → the ids of that folder's kind, in order."""

    pools: dict[int, list[str]] = Field(min_length=1)

    @field_validator("pools")
    @classmethod
    def _sized(cls, value: dict[int, list[str]]) -> dict[int, list[str]]:
        for k, ids in value.items():
            if k < 1:
                raise ValueError(f"pool size {k} must be at least 1")
            if len(ids) != k:
                raise ValueError(f"pool {k} lists {len(ids)} ids, not {k}")
            _require_unique(f"id in pool {k}", ids)
        return value


class Catalog(_Strict):
    """Everything the folders hold; `with_pool(k)` is the catalog a run with pool k uses.

    The pools are excluded from dumps: a narrowed catalog (which keeps none) is identified by its
    entries alone, so the simulator's cache keys depend on what a run uses, not on the pool files.
    """

    principles: list[Principle]
    attributes: list[Attribute]
    seeds: list[PersonaSeed]
    antonyms: AntonymCatalog | None = None
    principle_pools: dict[int, list[str]] = Field(default_factory=dict, exclude=True)
    attribute_pools: dict[int, list[str]] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> "Catalog":
        _require_unique("principle id", [p.id for p in self.principles])
        _require_unique("attribute id", [a.id for a in self.attributes])
        known = {p.id for p in self.principles}
        for attribute in self.attributes:
            unknown = set(attribute.stereotype) - known
            if unknown:
                raise ValueError(f"attribute {attribute.id!r} stereotype names unknown principles {sorted(unknown)}")
        markers = [m for p in self.principles for side in ("follow", "avoid") for m in p.markers(side)]
        _require_unique_substring_free("principle marker", markers)
        phrases = [ph for a in self.attributes for side in ("follow", "avoid") for ph in a.side(side).phrases]
        _require_unique_substring_free("attribute phrase", phrases)
        for kind, pools, ids in (("principle", self.principle_pools, known),
                                 ("attribute", self.attribute_pools, set(self.attribute_ids))):
            for k, members in pools.items():
                unknown_members = [m for m in members if m not in ids]
                if unknown_members:
                    raise ValueError(f"{kind} pool {k} names unknown {kind}s {unknown_members}")
        return self

    @property
    def principle_ids(self) -> list[str]:
        return [p.id for p in self.principles]

    @property
    def attribute_ids(self) -> list[str]:
        return [a.id for a in self.attributes]

    def principle(self, principle_id: str) -> Principle:
        return _by_id(self.principles, principle_id, "principle")

    def attribute(self, attribute_id: str) -> Attribute:
        return _by_id(self.attributes, attribute_id, "attribute")

    @property
    def pool_sizes(self) -> list[int]:
        """The k this catalog names a pool for (principles or attributes)."""
        return sorted(set(self.principle_pools) | set(self.attribute_pools))

    @property
    def largest_pool(self) -> int:
        return min(len(_pool_order(self.principle_ids, self.principle_pools)),
                   len(_pool_order(self.attribute_ids, self.attribute_pools)))

    def with_pool(self, k: int) -> "Catalog":
        """The named pool of size k where the catalog has one, else a prefix of its largest pool;
        entries outside every pool a run could use never reach the run."""
        if k < 1 or k > self.largest_pool:
            raise CatalogError(
                f"pool size {k} is out of range: this catalog's pools hold 1..{self.largest_pool} "
                f"principles and attributes ({len(self.principles)} principles and "
                f"{len(self.attributes)} attributes in all)"
            )
        principles = [self.principle(i) for i in _pool_ids(self.principle_ids, self.principle_pools, k)]
        kept = {p.id for p in principles}
        attributes = [
            self.attribute(i).model_copy(
                update={"stereotype": {p: w for p, w in self.attribute(i).stereotype.items() if p in kept}})
            for i in _pool_ids(self.attribute_ids, self.attribute_pools, k)
        ]
        return Catalog(principles=principles, attributes=attributes, seeds=self.seeds, antonyms=self.antonyms)

    def default_pool(self) -> "Catalog":
        """What a run uses by default (pool 10 of the shipped catalog): for tools that need one pool."""
        return self.with_pool(self.largest_pool)


def _pool_order(ids: list[str], pools: dict[int, list[str]]) -> list[str]:
    return pools[max(pools)] if pools else ids


def _pool_ids(ids: list[str], pools: dict[int, list[str]], k: int) -> list[str]:
    return pools[k] if k in pools else _pool_order(ids, pools)[:k]


def _by_id(items: list, item_id: str, kind: str):  # type: ignore[no-untyped-def]
    for item in items:
        if item.id == item_id:
            return item
    raise CatalogError(f"unknown {kind} {item_id!r}; known: {', '.join(i.id for i in items)}")


def _require_unique(kind: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {kind} {value!r}")
        seen.add(value)


def _require_unique_substring_free(kind: str, values: list[str]) -> None:
    """The simulator detects these strings by substring match, so one must never contain another."""
    _require_unique(kind, values)
    ordered = sorted(values, key=len)
    for i, short in enumerate(ordered):
        for long in ordered[i + 1 :]:
            if short in long:
                raise ValueError(f"{kind} {short!r} is contained in {long!r}")


# --------------------------------------------------------------------------- loading


def default_catalog_dir(name: str) -> Path:
    """Catalog folders live at the repository root; an installed wheel carries copies inside the package."""
    package_dir = Path(__file__).resolve().parents[1]
    for candidate in (package_dir.parent / name, package_dir / "_catalogs" / name):
        if candidate.is_dir():
            return candidate
    raise CatalogError(f"cannot find the built-in {name}/ catalog next to the apm_bench package")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CatalogError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise CatalogError(f"malformed YAML in {path}{line}: {problem}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path} must hold a YAML mapping at the top level")
    return data


def _list_under(path: Path, key: str) -> list:
    value = _read_yaml(path).get(key)
    if not isinstance(value, list):
        raise CatalogError(f"{path} needs a list under '{key}'")
    return value


def _read_pools(path: Path) -> dict[int, list[str]]:
    if not path.exists():
        return {}
    try:
        return PoolFile.model_validate(_read_yaml(path)).pools
    except ValidationError as exc:
        raise CatalogError(f"invalid pools in {path}: {first_error(exc)}") from None


def load_catalog(principles_dir: Path | None = None, personas_dir: Path | None = None) -> Catalog:
    principles_dir = Path(principles_dir) if principles_dir else default_catalog_dir("principles")
    personas_dir = Path(personas_dir) if personas_dir else default_catalog_dir("personas")
    for folder in (principles_dir, personas_dir):
        if not folder.is_dir():
            raise CatalogError(f"catalog folder not found: {folder}")
    principles_file = principles_dir / "principles.yaml"
    antonyms_file = principles_dir / "antonyms.yaml"
    attributes_file = personas_dir / "attributes.yaml"
    seeds_file = personas_dir / "seeds.yaml"
    try:
        principles = [Principle.model_validate(p) for p in _list_under(principles_file, "principles")]
        antonyms = AntonymCatalog.model_validate(_read_yaml(antonyms_file)) if antonyms_file.exists() else None
        attributes = [Attribute.model_validate(a) for a in _list_under(attributes_file, "attributes")]
        seeds = [PersonaSeed.model_validate(s) for s in _list_under(seeds_file, "seeds")] if seeds_file.exists() else []
        catalog = Catalog(principles=principles, attributes=attributes, seeds=seeds, antonyms=antonyms,
                          principle_pools=_read_pools(principles_dir / POOLS_FILE),
                          attribute_pools=_read_pools(personas_dir / POOLS_FILE))
    except ValidationError as exc:
        raise CatalogError(f"invalid catalog in {principles_dir} / {personas_dir}: {first_error(exc)}") from None
    if not catalog.principles or not catalog.attributes:
        raise CatalogError(f"catalog needs at least one principle ({principles_file}) and one attribute ({attributes_file})")
    return catalog
