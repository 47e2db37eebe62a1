"""Run configuration: one pydantic model, filled from defaults, a YAML file and CLI options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apm_bench.errors import ConfigError, first_error
from apm_bench.inputs import read_yaml
from apm_bench.judging.sim_judge import SimJudgeConfig
from apm_bench.run.protocol import Protocol, apply_protocol
from apm_bench.sim.writer import SimWriterConfig
from apm_bench.world.mapping import MappingKind
from apm_bench.world.prompting import InstructionTexts

Control = Literal["no-history", "shuffled-history"]
EngineRole = Literal["generator", "candidate_writer", "history_writer", "judge"]
#: φ's backends (methods/embedder.py); spelled out here so that reading a config stays light
EmbedderBackend = Literal["onnx-int8", "torch"]
SIM_JUDGE = "sim-judge"
SIM_WRITER = "sim"
#: named role sets: which model the candidate writer, the history writer and the judge run on
#: (None = the generator's model, engine and server). Applied to the roles the user did not set.
ROLE_PRESETS: dict[str, dict[str, str | None]] = {
    "same": {"candidate_model": None, "writer_model": None, "judge_model": None},
    # the APM paper: gpt-oss-120b rewrites histories and judges; candidates here come from the
    # generator (the paper used Nemotron-3-Super, which apm-bench ships no alias for)
    "paper": {"candidate_model": None, "writer_model": "gpt-oss-120b", "judge_model": "gpt-oss-120b"},
}


#: numbers numpy and scikit-learn accept as seeds
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
#: bounds that keep a typo from becoming a run that fills the machine's memory or never ends
MAX_USERS = 10_000_000
MAX_WORLDS = 1_000
MAX_HISTORY = 1_000
MAX_RESAMPLES = 100_000


def default_cache_path() -> Path:
    """`.apm-cache/calls.sqlite` under the working directory, or $APM_CACHE."""
    return Path(os.environ.get("APM_CACHE", ".apm-cache/calls.sqlite"))


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(default_factory=lambda: ["routing"], min_length=1)
    model: str = Field(default="sim-large", description="generator: a model alias, hub id or local path")
    backend: str | None = Field(default=None, description="engine for --model (default: the alias's own)")
    base_url: str | None = Field(default=None, description="server URL for the openai backend")
    candidate_model: str = Field(default="sim-large", description="model that writes the 2P candidates")
    candidate_backend: str | None = None
    candidate_url: str | None = None
    judge_model: str = Field(default="sim-judge", description="'sim-judge' (in process) or a model for the LLM judge")
    judge_backend: str | None = None
    judge_url: str | None = None
    judge_weighted: bool = Field(default=False, description="probability-weighted LLM judge scores from logprobs")
    judge_max_tokens: int = Field(default=8, ge=1)
    judge_temperature: float = Field(default=0.0, ge=0, description="LLM judge sampling temperature (seeded)")
    judge_reasoning_effort: Literal["low", "medium", "high"] | None = None
    judge_prompt: Literal["rubric", "paper"] = Field(default="rubric", description="the LLM judge's prompt")
    judge_scale: Literal[10, 100] = Field(default=10, description="100: rate 1–100, divided by 10")
    judge_parse: Literal["strict", "lenient"] = "strict"
    judge_top_p: float = Field(default=1.0, gt=0, le=1)
    judge_retries: int = Field(default=3, ge=0, description="re-asks for unparseable LLM judge answers")
    judge_forced_answer: Literal["follow-up", "continue"] = "follow-up"
    protocol: Protocol = Field(default="apm-bench", description="'paper': the APM authors' settings for every option left unset")
    writer_model: str = Field(default=SIM_WRITER, description="'sim' (phrase banks) or a model that rewrites prompts")
    writer_backend: str | None = None
    writer_prompt: Literal["apm-bench", "paper"] = Field(default="apm-bench", description="the LLM history writer's prompt")
    writer_temperature: float = Field(default=1.0, ge=0)
    writer_max_tokens: int = Field(default=1024, ge=1, description="raise for reasoning writers, which think first")
    writer_discard_truncated: bool = Field(
        default=False, description="discard a user whose rewrite the token budget cut (empty rewrites always are)")
    writer_url: str | None = None
    roles: Literal["same", "paper"] | None = Field(
        default=None, description="fill the roles not set explicitly: 'same' (all on the generator) or 'paper'"
    )
    allow_simulated_roles: bool = Field(
        default=False, description="let a real generator run with simulated candidates, histories or judge"
    )
    engine_options: dict[EngineRole, dict[str, Any]] = Field(
        default_factory=dict,
        description="engine options per role (generator, candidate_writer, history_writer, judge), over the "
                    "model alias's own: e.g. {judge: {tensor_parallel_size: 8}}; roles share an engine only "
                    "where model, backend, server and options are all equal",
    )
    engine_budget: int = Field(default=1, ge=1, description="engines holding device memory (vllm) resident at once")
    cache: Path | None = Field(default_factory=lambda: default_cache_path(), description="call cache (sqlite); None = off")
    worlds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1, max_length=MAX_WORLDS,
                               description="world seeds (one C each)")
    users: int = Field(default=400, ge=10, le=MAX_USERS, description="users in the population")
    n_attr: int = Field(default=1, ge=1, description="active attributes per user")
    pool: int = Field(default=10, ge=2, description="principles and attributes in the pool: the catalog's pool "
                                                    "of that size (pools.yaml), else a prefix of its largest")
    mapping: MappingKind = "permutation"
    n_perm: int = Field(default=1, ge=1, description="overlaid signed permutations in C")
    max_targets: int | None = Field(default=None, ge=1, description="keep only the largest |r| entries as targets")
    history_len: int = Field(default=8, ge=0, le=MAX_HISTORY, description="past messages per user")
    drawn_history_len: int | None = Field(
        default=None, ge=0, description="past messages drawn per simulated user, of which methods see the first "
                                        "history_len (None: history_len); a history-length curve sets its longest "
                                        "length, so shorter histories are prefixes of the same users' histories")
    train_users: int | None = Field(
        default=None, ge=1, description="at most this many training users to fit on: a nested, stratified subset "
                                        "(validation and test users unchanged; None: all)")
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    label_strategy: list[str] = Field(default_factory=lambda: ["margin"], min_length=1)
    control: Control | None = None
    data_seed: Seed = Field(default=0, description="seed of the population (attributes, histories, prompts)")
    balanced_population: bool = Field(
        default=True, description="attributes and sides used evenly by design (False: each user draws them independently)"
    )
    split_per_world: bool = Field(
        default=True, description="each world draws its own stratified split from its seed (False: the data seed's split serves every world)"
    )
    instruction_texts: InstructionTexts = Field(
        default="apm-bench", description="wording of style instructions and the RAG prompt: apm-bench's or 'paper'")
    gain_against: str = Field(
        default="oracle", description="the upper bound gain divides by: 'oracle' (target instruction) or 'oracle-router' (the paper's)")
    shared_baseline: bool = Field(
        default=False, description="one baseline response per test user, generated and judged once for all worlds")
    temperature: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=1024, ge=1, description="answer budget of candidates and test responses")
    judge: SimJudgeConfig = Field(default_factory=SimJudgeConfig)
    writer: SimWriterConfig = Field(default_factory=SimWriterConfig)
    principles_dir: Path | None = None
    personas_dir: Path | None = None
    prompts_file: Path | None = None
    test_prompts_file: Path | None = Field(
        default=None, description="prompts for test users only (e.g. UltraChat test_sft): every world's test users")
    disjoint_test_prompts: bool = Field(
        default=False, description="test users get their conversations from a share of the prompts no other user sees")
    conversations_file: Path | None = Field(default=None, description="users in the APM reference JSONL format")
    test_conversations_file: Path | None = Field(
        default=None, description="the authors' separate test file: its users are every world's test users")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bootstrap_resamples: int = Field(default=2000, ge=100, le=MAX_RESAMPLES)
    bootstrap_seed: Seed = 0
    out: Path = Path("results/runs")
    keep_artifacts: bool = Field(default=True, description="copy trained weights into the run folder")
    embedder: EmbedderBackend | None = Field(
        default=None, description="φ's engine: onnx-int8 or torch; unset: onnx-int8 where onnxruntime is installed "
                                  "(a run's config.json records the one it used)")

    @field_validator("label_strategy")
    @classmethod
    def _known_strategies(cls, value: list[str]) -> list[str]:
        from apm_bench.methods.routing import LABEL_STRATEGIES

        if value == ["all"]:
            return list(LABEL_STRATEGIES)
        unknown = [v for v in value if v not in LABEL_STRATEGIES]
        if unknown:
            raise ValueError(f"unknown label strategy {unknown[0]!r}; use one of {', '.join(LABEL_STRATEGIES)} or 'all'")
        return value

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str]) -> list[str]:
        repeated = sorted({m for m in value if value.count(m) > 1})
        if repeated:
            raise ValueError(f"method {repeated[0]!r} is listed twice; each method runs once per run")
        return value

    @field_validator("method_options")
    @classmethod
    def _options_of_known_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from apm_bench.errors import UnknownNameError
        from apm_bench.methods import METHODS

        for name in value:
            try:
                METHODS.get(name)
            except UnknownNameError as exc:
                raise ValueError(f"options for {exc}") from None
        return value

    @field_validator("worlds")
    @classmethod
    def _distinct_worlds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("world seeds must be distinct")
        return value

    @model_validator(mode="before")
    @classmethod
    def _protocol(cls, data: Any) -> Any:
        return apply_protocol(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _preset_roles(self) -> "RunConfig":
        """A preset fills each role the user left unset; the generator's engine goes with its model."""
        if self.roles is None:
            return self
        generator = {"model": self.model, "backend": self.backend, "url": self.base_url}
        for field, model in ROLE_PRESETS[self.roles].items():
            if field in self.model_fields_set:
                continue
            prefix = field.removesuffix("_model")
            same = model is None
            setattr(self, field, generator["model"] if same else model)
            setattr(self, f"{prefix}_backend", generator["backend"] if same else None)
            if prefix in ("judge", "writer"):
                setattr(self, f"{prefix}_url", generator["url"] if same else None)
        return self

    @model_validator(mode="after")
    def _roles_on_the_generators_model(self) -> "RunConfig":
        """A role on the generator's model that names no engine of its own runs on the generator's
        engine and server, so `--backend vllm` moves every role of that model (one engine, not two)."""
        for prefix, url_field in (("candidate", "candidate_url"), ("writer", "writer_url"), ("judge", "judge_url")):
            if getattr(self, f"{prefix}_model") != self.model or f"{prefix}_backend" in self.model_fields_set:
                continue
            if getattr(self, f"{prefix}_backend") is None and getattr(self, url_field) is None:
                setattr(self, f"{prefix}_backend", self.backend)
                setattr(self, url_field, self.base_url)
        return self

    @model_validator(mode="after")
    def _test_file_needs_a_train_file(self) -> "RunConfig":
        if self.test_conversations_file is not None and self.conversations_file is None:
            raise ValueError("test_conversations_file needs conversations_file (the training users)")
        return self

    @model_validator(mode="after")
    def _weighted_judge_on_ten_points(self) -> "RunConfig":
        if self.judge_weighted and self.judge_scale != 10:
            raise ValueError("judge_weighted reads the scores 1..10 from one token; it needs judge_scale 10")
        return self

    @model_validator(mode="after")
    def _drawn_history(self) -> "RunConfig":
        if self.drawn_history_len is not None and self.drawn_history_len < self.history_len:
            raise ValueError(f"drawn_history_len {self.drawn_history_len} is shorter than history_len {self.history_len}")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> "RunConfig":
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation and test fractions leave too few training users")
        return self


def estimated_memory(config: RunConfig) -> int:
    """A rough upper bound of a run's peak memory in bytes, from its sizes: the libraries and φ,
    every user's messages, candidates and embeddings, and one row per (world, test user, method).
    It exists to refuse, before any work, a run that could never fit, not to plan tight ones."""
    per_user = (config.history_len + 2 * config.pool + 2) * 4096
    samples = len(config.worlds) * config.users * config.test_fraction * (len(config.methods) + 3) * 4096
    return int(1.5 * 2**30 + config.users * per_user + samples)


def check_memory(config: RunConfig) -> None:
    """Refuse a run whose estimate exceeds the machine's physical memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not knowable here (e.g. some non-Linux systems)
        return
    needed = estimated_memory(config)
    if needed > physical:
        raise ConfigError(f"a run of {config.users} users × {len(config.worlds)} worlds needs about "
                          f"{needed / 2**30:.0f} GiB, more than this machine's {physical / 2**30:.0f} GiB; "
                          f"lower --users or --worlds")


def load_config(path: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults ← YAML file ← CLI options (only those the user actually set)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, "config file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of run options")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid run option {first_error(exc)}") from None
