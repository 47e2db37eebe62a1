"""`apm judge agreement`: how closely an LLM judge rates like `sim-judge`, on the same answers.

An LLM judge can stand in for the simulator's only if it ranks answers as `sim-judge` does. Both
rate the same (answer, principle) pairs: answers a writer gave under a FOLLOW or AVOID
instruction or none, each rated on the instructed principle and on one drawn at random (where
most answers should sit at the midpoint). A judge that rates everything 5 scores 0 here, and one
whose scores drift to one side shows it in the means per side. Failed ratings are counted, never
dropped from the count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from apm_bench.backends.base import Backend, GenerationRequest, chat
from apm_bench.judging.judge import Judge, RatingRequest
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import Catalog
from apm_bench.world.prompting import style_instruction
from apm_bench.world.prompts import NeutralPrompt

SIDES = ("follow", "avoid", "none")


def rated_pairs(catalog: Catalog, prompts: list[NeutralPrompt], writer: Backend, judge: Judge, reference: Judge,
                answers: int, seed: int) -> pd.DataFrame:
    """One row per (answer, principle): both judges' scores, the side the writer was told, and
    whether the principle is the instructed one or a random one."""
    rng = np.random.default_rng([seed, 0xA6E])
    principles = catalog.principles
    plan = []
    for i in range(answers):
        instructed, side = principles[i % len(principles)], SIDES[(i // len(principles)) % len(SIDES)]
        prompt = prompts[int(rng.integers(len(prompts)))].text
        other = principles[int(rng.integers(len(principles)))]
        plan.append((instructed.id, side, prompt, None if side == "none" else style_instruction(instructed, side), other.id))
    written = writer.generate([GenerationRequest(chat(prompt, system=system), seed=stable_seed("agreement", seed, i))
                               for i, (_, _, prompt, system, _) in enumerate(plan)])
    requests, sides, probed = [], [], []
    for i, ((instructed, side, prompt, _, other), answer) in enumerate(zip(plan, written)):
        for principle, kind in ((instructed, "instructed"), (other, "random")):
            requests.append(RatingRequest(prompt, answer.text, principle, seed=stable_seed("agreement-rating", seed, i, kind)))
            sides.append(side)
            probed.append(kind)
    theirs, ours = judge.rate(requests), reference.rate(requests)
    return pd.DataFrame({
        "principle": [r.principle for r in requests], "side": sides, "probed": probed,
        "reference": [r.score for r in ours], "judge": [r.score for r in theirs],
        "judge_error": [r.error for r in theirs],
    })


def agreement_summary(pairs: pd.DataFrame) -> dict:
    """Correlation (Pearson, Spearman), mean absolute difference, exact and within-one agreement,
    and each judge's mean on the instructed principle per side."""
    rated = pairs.dropna(subset=["reference", "judge"])
    reference, judge = rated["reference"].astype(float), rated["judge"].astype(float)
    instructed = rated[rated["probed"] == "instructed"]
    by_side = instructed.groupby("side")[["reference", "judge"]].mean()
    return {
        "pairs": int(len(pairs)), "failed": int(pairs["judge"].isna().sum()),
        "pearson": _correlation(reference, judge, "pearson"), "spearman": _correlation(reference, judge, "spearman"),
        "mean_abs_diff": _rounded((reference - judge).abs().mean()),
        "exact": _rounded((reference == judge).mean()), "within_one": _rounded(((reference - judge).abs() <= 1).mean()),
        "instructed_mean_by_side": {side: {k: _rounded(v) for k, v in row.items()} for side, row in by_side.iterrows()},
        "random_mean": {k: _rounded(v) for k, v in rated[rated["probed"] == "random"][["reference", "judge"]].mean().items()},
    }


def _correlation(a: pd.Series, b: pd.Series, method: str) -> float | None:
    """None where either judge gave one score throughout: no correlation is defined, and 0 would flatter it."""
    if a.nunique() < 2 or b.nunique() < 2:
        return None
    return _rounded(a.corr(b, method=method))


def _rounded(value: float) -> float | None:
    return None if pd.isna(value) else round(float(value), 4)


def write_agreement(pairs: pd.DataFrame, summary: dict, out: Path, judge_name: str, reference_name: str,
                    weighted: bool = False) -> list[Path]:
    """`<judge>-agreement.csv` (every pair), `.json` (the summary) and `.md` (the tables); a judge's
    weighted scores go to `<judge>_weighted-agreement.*` (as `apm judge calibrate` names them), beside its sampled ones."""
    from apm_bench.judging.calibration import judge_file_name

    out.mkdir(parents=True, exist_ok=True)
    summary = {**summary, "scores": "weighted" if weighted else "sampled"}
    stem = out / f"{judge_file_name(judge_name)}{'_weighted' if weighted else ''}-agreement"
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".md")]
    pairs.to_csv(paths[0], index=False)
    paths[1].write_text(json.dumps({"judge": judge_name, "reference": reference_name, **summary}, indent=2) + "\n",
                        encoding="utf-8")
    paths[2].write_text(agreement_markdown(summary, judge_name, reference_name), encoding="utf-8")
    return paths


def agreement_markdown(summary: dict, judge_name: str, reference_name: str) -> str:
    def cell(value: float | None, form: str) -> str:
        return "–" if value is None else format(value, form)

    lines = [f"# {judge_name} against {reference_name}", "",
             f"{summary['pairs']} (answer, principle) pairs; {summary['failed']} ratings failed; "
             f"{judge_name}'s scores {summary.get('scores', 'sampled')}.", "",
             "| Pearson | Spearman | mean abs. diff. | exact | within 1 |", "|---:|---:|---:|---:|---:|",
             f"| {cell(summary['pearson'], '.3f')} | {cell(summary['spearman'], '.3f')} | "
             f"{cell(summary['mean_abs_diff'], '.2f')} | {cell(summary['exact'], '.0%')} | {cell(summary['within_one'], '.0%')} |",
             "", f"| answers rated on | {reference_name} | {judge_name} |", "|---|---:|---:|"]
    for side, row in summary["instructed_mean_by_side"].items():
        told = "no instruction" if side == "none" else f"a {side.upper()} instruction"
        lines.append(f"| the principle, answer written with {told} | {cell(row['reference'], '.2f')} | {cell(row['judge'], '.2f')} |")
    random = summary["random_mean"]
    lines.append(f"| a principle drawn at random | {cell(random['reference'], '.2f')} | {cell(random['judge'], '.2f')} |")
    return "\n".join(lines) + "\n"
