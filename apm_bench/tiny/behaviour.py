"""What a model learned, principle by principle: `apm tiny-model report`.

Three probes, each on prompts the model was never trained on, each rated by `sim-judge` on the
principle it probes, each asked of the model and of `sim-large` with the same seeds:

- **instruction**: a FOLLOW or AVOID instruction for the principle (the candidates' and routing's
  system prompt), or none;
- **imitation**: RAG's context with examples whose best answers follow the principle and worst
  answers avoid it, or the reverse, or no examples;
- **summary**: POPI's context with a summary saying the user likes, or dislikes, the principle's
  kind of answer, or no summary.

A model that learned the benchmark's conventions scores high under FOLLOW (likes, best = follow),
low under AVOID, and in between without a cue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from apm_bench.backends.base import Backend, GenerationRequest, SamplingParams, chat
from apm_bench.judging.judge import SCORE_MIDPOINT, RatingRequest
from apm_bench.judging.sim_judge import SimJudge
from apm_bench.methods.rag import examples_system_prompt
from apm_bench.sim.style import stable_seed
from apm_bench.sim.summarizer import statements
from apm_bench.world.catalog import Catalog, Principle
from apm_bench.world.prompting import example_block, style_instruction, summary_context
from apm_bench.world.prompts import NeutralPrompt

PROBES = ("instruction", "imitation", "summary")
#: the cue's direction: toward the principle, none, away from it
CONDITIONS = ("follow", "none", "avoid")


class BehaviourConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts_per_principle: int = Field(default=20, ge=1)
    examples: int = Field(default=3, ge=1, description="retrieved examples in an imitation context")
    temperature: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    seed: int = Field(default=0, ge=0)


@dataclass(frozen=True)
class Probe:
    probe: str
    principle: str
    condition: str
    prompt: str
    request: GenerationRequest


def probes(catalog: Catalog, prompts: list[NeutralPrompt], examples: dict[tuple[str, str], list[tuple[str, str]]],
           config: BehaviourConfig) -> list[Probe]:
    """Every probe request; `examples[(principle, side)]` holds (prompt, answer) pairs written to
    one side of the principle, from which imitation contexts take their best and worst answers."""
    likes = statements(catalog.principles, catalog.attributes)
    n = len(catalog.principles)
    rows = []
    for p_index, principle in enumerate(catalog.principles):
        chosen = _prompts_for(principle, prompts, config)
        for i, prompt in enumerate(chosen):
            seed = stable_seed("tiny-behaviour", config.seed, principle.id, i)
            params = SamplingParams(temperature=config.temperature, max_tokens=config.max_tokens)
            contexts = {
                ("instruction", "follow"): style_instruction(principle, "follow"),
                ("instruction", "avoid"): style_instruction(principle, "avoid"),
                ("imitation", "follow"): _imitation(examples, principle, "follow", "avoid", i, config.examples),
                ("imitation", "avoid"): _imitation(examples, principle, "avoid", "follow", i, config.examples),
                ("summary", "follow"): summary_context(likes[p_index]),
                ("summary", "avoid"): summary_context(likes[n + p_index]),
            }
            for probe in PROBES:
                for condition in CONDITIONS:
                    system = contexts.get((probe, condition))
                    request = GenerationRequest(chat(prompt.text, system=system), seed=seed, params=params)
                    rows.append(Probe(probe, principle.id, condition, prompt.text, request))
    return rows


def _prompts_for(principle: Principle, prompts: list[NeutralPrompt], config: BehaviourConfig) -> list[NeutralPrompt]:
    rng = np.random.default_rng(stable_seed("tiny-behaviour-prompts", config.seed, principle.id))
    return [prompts[i] for i in rng.choice(len(prompts), size=config.prompts_per_principle,
                                           replace=config.prompts_per_principle > len(prompts))]


def _imitation(examples: dict[tuple[str, str], list[tuple[str, str]]], principle: Principle, best: str, worst: str,
               offset: int, k: int) -> str:
    """k example blocks: the best answers written to one side of the principle, the worst to the other."""
    good, bad = examples[(principle.id, best)], examples[(principle.id, worst)]
    blocks = []
    for j in range(k):
        prompt, best_answer = good[(offset * k + j) % len(good)]
        _, worst_answer = bad[(offset * k + j) % len(bad)]
        blocks.append(example_block(prompt, best_answer, worst_answer))
    return examples_system_prompt(blocks)


def example_answers(writer: Backend, catalog: Catalog, prompts: list[NeutralPrompt], per_side: int,
                    seed: int) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """Answers written under a FOLLOW or an AVOID instruction, as a candidate writer writes them."""
    requests, keys = [], []
    for principle in catalog.principles:
        for side in ("follow", "avoid"):
            for i in range(per_side):
                prompt = prompts[(i * 7 + len(keys)) % len(prompts)]
                requests.append(GenerationRequest(chat(prompt.text, system=style_instruction(principle, side)),
                                                  seed=stable_seed("tiny-examples", seed, principle.id, side, i)))
                keys.append((principle.id, side, prompt.text))
    answers: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for (principle, side, prompt), generation in zip(keys, writer.generate(requests)):
        answers.setdefault((principle, side), []).append((prompt, generation.text))
    return answers


def measure(model: Backend, rows: list[Probe], judge: SimJudge, label: str,
            say: Callable[[str], None] = lambda line: None) -> pd.DataFrame:
    """One row per probe: the judge's score of the model's answer on the probed principle."""
    say(f"{label}: {len(rows)} answers")
    generations = model.generate([r.request for r in rows])
    ratings = judge.rate([RatingRequest(r.prompt, g.text, r.principle, seed=r.request.seed)
                          for r, g in zip(rows, generations)])
    return pd.DataFrame({
        "model": label, "probe": [r.probe for r in rows], "principle": [r.principle for r in rows],
        "condition": [r.condition for r in rows],
        "score": [np.nan if g.failed or rating.score is None else rating.score for g, rating in zip(generations, ratings)],
        "failed": [g.failed for g in generations],
    })


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean score per (probe, model, principle, condition), with 'all' over principles, and the
    share of cued answers on the cued side of the scale's midpoint."""
    everything = pd.concat([scores, scores.assign(principle="all")], ignore_index=True)
    means = everything.pivot_table(index=["probe", "model", "principle"], columns="condition", values="score",
                                   aggfunc="mean")[list(CONDITIONS)]
    cued = everything[everything["condition"] != "none"]
    right = np.where(cued["condition"] == "follow", cued["score"] > SCORE_MIDPOINT, cued["score"] < SCORE_MIDPOINT)
    means["right_side"] = cued.assign(right=right).groupby(["probe", "model", "principle"])["right"].mean()
    means["gap"] = means["follow"] - means["avoid"]
    return means.reset_index()


def markdown(summary: pd.DataFrame, models: list[str]) -> str:
    """One table per probe: a row per principle, FOLLOW / none / AVOID per model."""
    parts = []
    for probe in [p for p in PROBES if p in set(summary["probe"])]:
        rows = summary[summary["probe"] == probe]
        header = "| principle | " + " | ".join(f"{m} FOLLOW | {m} none | {m} AVOID" for m in models) + " |"
        lines = [f"### {probe}", "", header, "|---|" + "---:|" * (3 * len(models))]
        principles = [p for p in dict.fromkeys(rows["principle"]) if p != "all"] + ["all"]
        for principle in principles:
            cells = []
            for model in models:
                row = rows[(rows["model"] == model) & (rows["principle"] == principle)].iloc[0]
                cells += [f"{row[c]:.2f}" for c in CONDITIONS]
            name = "**all**" if principle == "all" else principle
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        shares = ", ".join(
            f"{m} {rows[(rows['model'] == m) & (rows['principle'] == 'all')].iloc[0]['right_side']:.0%}" for m in models)
        lines += ["", f"Cued answers on the cued side of the midpoint: {shares}.", ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def write_behaviour(scores: pd.DataFrame, out: Path, models: list[str], header: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(scores)
    paths = [out / "behaviour-scores.csv", out / "behaviour.csv", out / "behaviour.md"]
    scores.to_csv(paths[0], index=False)
    summary.round(4).to_csv(paths[1], index=False)
    paths[2].write_text(header + "\n\n" + markdown(summary, models), encoding="utf-8")
    return paths


def behaviour_report(model: str, backend: str | None, options: dict, config: BehaviourConfig, out: Path,
                     say: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Probe `model` and sim-large on the held-out prompts; write the scores, the summary and the tables."""
    from apm_bench.backends import load_backend, resolve_model
    from apm_bench.run.config import RunConfig
    from apm_bench.run.setup import load_pool_catalog
    from apm_bench.tiny.corpus import held_out_prompts

    resolve_model(model, backend)  # an unknown name fails before any answer is written
    catalog = load_pool_catalog(RunConfig())
    _, prompts = held_out_prompts()
    reference = load_backend("sim-large", catalog, seed=config.seed)
    examples = example_answers(reference, catalog, prompts, per_side=3 * config.examples, seed=config.seed)
    rows = probes(catalog, prompts, examples, config)
    judge = SimJudge(catalog.principles)
    engine = load_backend(model, catalog, seed=config.seed, backend=backend, options=options)
    try:
        scores = pd.concat([measure(engine, rows, judge, model, say), measure(reference, rows, judge, "sim-large", say)],
                           ignore_index=True)
    finally:
        engine.close()
    header = (f"# What {model} learned\n\nMean sim-judge score (1–10) of the probed principle, on {len(prompts)} "
              f"prompts no training example used ({config.prompts_per_principle} per principle and condition; "
              f"seed {config.seed}).")
    return write_behaviour(scores, out, [model, "sim-large"], header)
