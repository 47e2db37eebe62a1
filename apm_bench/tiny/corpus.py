"""apm-tiny's training corpus: what the benchmark's own methods ask a generator, answered by `sim-large`.

Rather than guessing which contexts matter, the corpus records real runs on the simulator: every
request the methods send (candidate instructions, POPI's summary requests and summary-led answers,
RAG's best/worst examples, histories in context, bare prompts) with the simulator's answer. Runs
use only the prompts evaluation never shows a test user: the held-out share is the one
`disjoint_test_prompts` gives test users at the default data seed, so a run with
`disjoint_test_prompts: true` tests the model on prompts it was never trained on.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apm_bench.backends.base import Backend, Generation, GenerationRequest
from apm_bench.errors import ConfigError, first_error
from apm_bench.run.config import RunConfig
from apm_bench.run.runner import run_benchmark
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompts import NeutralPrompt, load_prompts, split_prompt_pools

#: the methods whose requests the corpus records (the weight-training ones send the same texts
#: with adapters or soft prompts, which a corpus cannot hold)
CORPUS_METHODS = ("baseline", "oracle", "history", "routing", "rag", "popi")


#: examples per kind of context: instructions most (candidates, oracle, routing), the long kinds
#: (retrieved examples, histories, summary requests) fewer; three default runs record about 3 000
#: retrieved-example contexts, so that quota is a ceiling
DEFAULT_MIX = {"instruction": 8000, "summary-context": 5000, "summary-request": 2500, "examples": 4000,
               "history": 3000, "bare": 2000}


class CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: str = Field(default="sim-large", description="the simulated model whose answers the corpus holds")
    runs: int = Field(default=3, ge=1, description="recorded runs, each on its own data seed")
    users: int = Field(default=1000, ge=10, description="users per recorded run")
    worlds: int = Field(default=2, ge=1, description="worlds per recorded run")
    test_fraction: float = Field(default=0.5, gt=0, lt=1, description="test users per recorded run: their "
                                                                     "requests carry histories and examples")
    plain: int = Field(default=24000, ge=0, description="first-lesson examples (`plain_examples`)")
    judge: int = Field(default=6000, ge=0, description="LLM-judge requests rated as `sim-judge` rates (`judge_examples`)")
    rewrite: int = Field(default=3000, ge=0, description="history-writer requests rewritten as the simulator's "
                                                         "writer does (`rewrite_examples`)")
    per_kind: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_MIX),
        description="at most this many examples of each kind of context (kinds not named: none)")
    seed: int = Field(default=0, ge=0)


class Example(BaseModel):
    """One (context → answer) pair; `kind` says which kind of context it is."""

    model_config = ConfigDict(frozen=True)

    kind: str
    messages: list[tuple[str, str]]
    answer: str


def held_out_prompts(prompts: list[NeutralPrompt] | None = None) -> tuple[list[NeutralPrompt], list[NeutralPrompt]]:
    """(prompts the corpus may use, prompts it never uses): the split a default run with
    `disjoint_test_prompts` makes, so its test users see only the second list."""
    defaults = RunConfig()
    return split_prompt_pools(prompts or load_prompts(None), defaults.test_fraction, defaults.history_len + 1,
                              defaults.data_seed)


def context_kind(request: GenerationRequest) -> str:
    """What a request's context holds, read from its system message (the texts of world/prompting)."""
    system = next((m.content for m in request.messages if m.role == "system"), None)
    if system is None:
        return "history-turns" if sum(m.role == "user" for m in request.messages) > 1 else "bare"
    for marker, kind in KIND_MARKERS:
        if marker in system:
            return kind
    return "other"


#: a phrase of each system text methods send, and the kind of context it marks
KIND_MARKERS = (
    ("strictly adhering to this response principle", "instruction"),
    ("write a short summary", "summary-request"),
    ("What we know about this user's preferences", "summary-context"),
    ("earlier messages this user sent you", "history"),
    ("<examples>", "examples"),
)


class RecordingBackend(Backend):
    """Passes every call to the engine it wraps and keeps each plain-text request with its answer."""

    def __init__(self, inner: Backend, sink: list[Example]) -> None:
        self.inner = inner
        self.sink = sink
        self.name, self.model, self.capabilities = inner.name, inner.model, inner.capabilities

    def __getattr__(self, name: str):  # training interface, adapters, token counts: the engine's own
        return getattr(self.inner, name)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        generations = self.inner.generate(requests)
        for request, generation in zip(requests, generations):
            if request.adapter is None and request.soft_prompt is None and not generation.failed:
                messages = [(m.role, m.content) for m in request.messages]
                self.sink.append(Example(kind=context_kind(request), messages=messages, answer=generation.text))
        return generations

    def close(self) -> None:
        self.inner.close()


def record_corpus(config: CorpusConfig) -> list[Example]:
    """The first lesson (`plain_examples`), then every plain request of `config.runs` simulated
    runs with their answers, as many of each kind as `per_kind` says (a seeded draw), in a seeded order."""
    trainable, _ = held_out_prompts()
    recorded: list[Example] = []
    with tempfile.TemporaryDirectory(prefix="apm-tiny-corpus-") as folder:
        prompts_file = Path(folder) / "prompts.jsonl"
        prompts_file.write_text("".join(p.model_dump_json() + "\n" for p in trainable), encoding="utf-8")
        for run in range(config.runs):
            run_config = RunConfig(
                methods=list(CORPUS_METHODS), model=config.teacher, candidate_model=config.teacher,
                users=config.users, worlds=[config.seed * 1000 + run * 10 + w for w in range(config.worlds)],
                data_seed=config.seed * 1000 + run, test_fraction=config.test_fraction, prompts_file=prompts_file,
                cache=None, out=Path(folder) / "runs", keep_artifacts=False,
            )
            run_benchmark(run_config, wrap_engine=lambda engine: RecordingBackend(engine, recorded))
    first = plain_examples(config.teacher, trainable, config.plain, config.seed)
    generator = balance(recorded, config.per_kind, config.seed)
    answers = [e for e in generator if e.kind != "summary-request"]  # summaries are not answers to rate
    roles = (judge_examples([e.answer for e in answers], [e.messages[-1][1] for e in answers], config.judge, config.seed)
             + rewrite_examples(trainable, config.rewrite, config.seed))
    return first + shuffled(generator + roles, config.seed)


#: the kind of the short first-lesson examples (`plain_examples`)
PLAIN = "plain"


def plain_examples(teacher: str, prompts: list[NeutralPrompt], count: int, seed: int) -> list[Example]:
    """The first lesson: bare neutral prompts (not rewritten in a user's voice) with no instruction
    or a FOLLOW / AVOID instruction, answered by the teacher. Short contexts are where a small
    model first learns to read its context (copy the topic, obey the instruction); in the long
    contexts of real runs that signal is too diluted to be found from scratch."""
    from apm_bench.backends import load_backend
    from apm_bench.backends.base import chat
    from apm_bench.world.prompting import style_instruction

    catalog = default_catalog()
    rng = np.random.default_rng([seed, 0x9A1])
    requests = []
    for i in range(count):
        prompt = prompts[int(rng.integers(len(prompts)))].text
        choice = int(rng.integers(2 * len(catalog.principles) + 1))
        system = None if choice == 0 else style_instruction(catalog.principles[(choice - 1) // 2],
                                                            "follow" if choice % 2 else "avoid")
        requests.append(GenerationRequest(chat(prompt, system=system), seed=stable_seed("tiny-plain", seed, i)))
    answers = load_backend(teacher, catalog, seed=seed).generate(requests)
    return [Example(kind=PLAIN, messages=[(m.role, m.content) for m in r.messages], answer=a.text)
            for r, a in zip(requests, answers)]


def balance(examples: list[Example], per_kind: dict[str, int], seed: int) -> list[Example]:
    """Distinct examples, at most `per_kind[kind]` of each kind, shuffled with `seed`: candidates'
    instructions and POPI's fits would otherwise outnumber the examples and histories."""
    rng = np.random.default_rng([seed, 0x7111])
    by_kind: dict[str, list[Example]] = defaultdict(list)
    seen: set[str] = set()
    for example in examples:
        key = json.dumps([example.messages, example.answer])
        if key not in seen:
            seen.add(key)
            by_kind[example.kind].append(example)
    kept = []
    for kind in sorted(by_kind):
        rows = by_kind[kind]
        picks = rng.permutation(len(rows))[: per_kind.get(kind, 0)]
        kept.extend(rows[i] for i in sorted(picks))
    return [kept[i] for i in rng.permutation(len(kept))]


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    rng = np.random.default_rng([seed, 0x5F1])
    return [examples[i] for i in rng.permutation(len(examples))]


#: the kinds of the other roles' requests: the LLM judge's and the history writer's
JUDGE, REWRITE = "judge", "rewrite"


def judge_examples(answers: list[str], prompts: list[str], count: int, seed: int) -> list[Example]:
    """The LLM judge's rubric request for answers the teacher wrote, answered with `sim-judge`'s
    score. Of every four, two are rated on a principle the answer shows most (so high and low
    scores occur as often as runs produce them), one on a principle drawn at random (mostly the
    midpoint), and one on a word of an antonym pair, as `apm judge calibrate` asks."""
    from apm_bench.judging.calibration import SimProxyJudge, antonym_principles
    from apm_bench.judging.judge import RatingRequest
    from apm_bench.judging.judge_prompts import judge_messages
    from apm_bench.judging.sim_judge import SimJudge

    if count == 0 or not answers:
        return []
    catalog = default_catalog()
    judge = SimJudge(catalog.principles)
    words = antonym_principles(catalog.antonyms) if catalog.antonyms is not None else []
    by_word = SimProxyJudge(judge, catalog.antonyms) if words else None
    rng = np.random.default_rng([seed, 0x10D6])
    examples = []
    for n, index in enumerate(rng.choice(len(answers), size=count, replace=count > len(answers))):
        prompt, answer = prompts[int(index)], answers[int(index)]
        shown = np.abs(judge.codec.measure(answer))
        if n % 4 == 3 and by_word is not None:
            principle, rater = words[int(rng.integers(len(words)))], by_word
        elif n % 4 < 2 and shown.any():
            principle, rater = catalog.principles[int(rng.choice(np.flatnonzero(shown == shown.max())))], judge
        else:
            principle, rater = catalog.principles[int(rng.integers(len(catalog.principles)))], judge
        rating = rater.rate([RatingRequest(prompt, answer, principle.id, seed=stable_seed("tiny-judge", seed, n))])[0]
        if rating.score is not None:
            messages = [(m.role, m.content) for m in judge_messages(principle, prompt, answer)]
            examples.append(Example(kind=JUDGE, messages=messages, answer=str(int(round(rating.score)))))
    return examples


def rewrite_examples(prompts: list[NeutralPrompt], count: int, seed: int) -> list[Example]:
    """The history writer's request (`LLMHistoryWriter`'s wording) for a trainable prompt and a
    drawn user (one or two attributes on drawn sides, a persona or none), answered with the
    simulator's writer's rewrite: the request verbatim, wrapped in phrases that show the traits."""
    from apm_bench.backends.history_writer import rewrite_messages
    from apm_bench.sim.writer import SimHistoryWriter
    from apm_bench.world.users import AttributeSetting

    catalog = default_catalog()
    writer = SimHistoryWriter(catalog)
    rng = np.random.default_rng([seed, 0x3E7])
    examples = []
    for _ in range(count):
        chosen = rng.choice(len(catalog.attributes), size=int(rng.integers(1, 3)), replace=False)
        attributes = [AttributeSetting(attribute=catalog.attributes[int(i)].id,
                                       side="follow" if rng.random() < 0.5 else "avoid") for i in chosen]
        persona = catalog.seeds[int(rng.integers(len(catalog.seeds)))] if rng.random() < 0.5 else None
        text = prompts[int(rng.integers(len(prompts)))].text
        messages = rewrite_messages(catalog, text, attributes, persona)
        answer = writer.rewrite([text], attributes, persona, rng)[0]
        examples.append(Example(kind=REWRITE, messages=[(m.role, m.content) for m in messages], answer=answer))
    return examples


def default_catalog() -> Catalog:
    """The catalog of a default run: the principles and attributes the roles are asked about."""
    from apm_bench.run.setup import load_pool_catalog

    return load_pool_catalog(RunConfig())


def write_corpus(examples: list[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(e.model_dump_json() + "\n" for e in examples), encoding="utf-8")


def read_corpus(path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(Example.model_validate_json(line))
        except ValidationError as exc:
            raise ConfigError(f"{path}:{number}: not a corpus line ({first_error(exc)})") from None
    return examples


def kind_counts(examples: list[Example]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for example in examples:
        counts[example.kind] += 1
    return dict(sorted(counts.items()))

