"""Grading multiple-choice answers: the answer letter read from a reply, and accuracy per
benchmark and method with its difference to the unpersonalized baseline on the same questions.

The parser reads what a model states, not the first capital it sees: an explicit "the answer is
(C)" wins, then a reply that opens with a letter ("B", "(B)", "B. Paris"), then a letter standing
alone only if it is the one such letter among the options. Anything else is unparseable; it counts
as wrong and is reported separately, so a method that makes the model stop answering in letters
shows up as such. (The authors' parser takes a reply's first character whenever it is a capital,
so "The answer is C" reads as "T".)
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from pydantic import BaseModel

from apm_bench.judging.metrics import bootstrap_ci

#: reasoning models think first: a closed <think> block is not the answer
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)
_STATED = re.compile(r"(?i:\b(?:answer|option|choice)(?:\s+(?:is|would\s+be|will\s+be))?)\s*[:=-]?\s*"
                     r"[(\[]?([A-Z])[)\]]?(?![A-Za-z0-9'])")
_OPENING = re.compile(r"^[(\[]?([A-Z])(?:[)\]:.,]|\s*$|\s*\n)")
_ALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def parse_letter(response: str, letters: str) -> str | None:
    """The option letter a reply gives (one of `letters`), or None where it gives none clearly."""
    text = re.sub(r"[*_`]", "", _THINKING.sub("", response)).strip()
    valid = set(letters)
    stated = [m.group(1) for m in _STATED.finditer(text) if m.group(1) in valid]
    if stated:
        return stated[-1]  # after reasoning, the last statement is the final one
    opening = _OPENING.match(text)
    if opening and opening.group(1) in valid:
        return opening.group(1)
    alone = {m.group(1) for m in _ALONE.finditer(text)} & valid
    return alone.pop() if len(alone) == 1 else None


class AccuracyMetrics(BaseModel):
    benchmark: str
    method: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    #: accuracy − the baseline's on the same questions, paired bootstrap CI; None for the baseline
    delta: float | None = None
    delta_ci_low: float | None = None
    delta_ci_high: float | None = None
    #: replies with no readable answer letter (counted as wrong)
    unparseable: int = 0
    #: questions whose prompt did not fit the generator's context (no reply; counted as wrong)
    failed_generations: int = 0
    #: prompts whose history or examples were cut to fit the context
    trimmed_prompts: int = 0


class CategoryAccuracy(BaseModel):
    benchmark: str
    category: str
    method: str
    n: int
    correct: int
    accuracy: float


def accuracy_metrics(rows: pd.DataFrame, seed: int, n_resamples: int = 2000,
                     baseline: str = "baseline") -> list[AccuracyMetrics]:
    """One entry per (benchmark, method) of `rows` (one row per question and method, with
    `correct`, `unparseable`, `generation_error`, `context_trimmed`), in the order they appear."""
    metrics = []
    for benchmark in dict.fromkeys(rows["benchmark"]):
        subset = rows[rows["benchmark"] == benchmark]
        reference = subset[subset["method"] == baseline].set_index("question_id")["correct"].astype(float)
        for method in dict.fromkeys(subset["method"]):
            mine = subset[subset["method"] == method]
            correct = mine["correct"].to_numpy(dtype=float)
            low, high = bootstrap_ci(correct, seed, n_resamples)
            entry = AccuracyMetrics(
                benchmark=benchmark, method=method, n=len(mine), correct=int(correct.sum()),
                accuracy=float(correct.mean()), ci_low=low, ci_high=high,
                unparseable=int(mine["unparseable"].sum()),
                failed_generations=int(mine["generation_error"].notna().sum()),
                trimmed_prompts=int((mine["context_trimmed"] > 0).sum()),
            )
            if method != baseline and len(reference):
                diff = correct - mine["question_id"].map(reference).to_numpy(dtype=float)
                d_low, d_high = bootstrap_ci(diff, seed, n_resamples)  # the same questions resampled for both
                entry = entry.model_copy(update={"delta": float(np.mean(diff)), "delta_ci_low": d_low,
                                                 "delta_ci_high": d_high})
            metrics.append(entry)
    return metrics


def category_accuracy(rows: pd.DataFrame) -> list[CategoryAccuracy]:
    """Accuracy per category (BBQ's bias categories, MMLU-Pro's subjects), without intervals."""
    labelled = rows[rows["category"] != ""]
    grouped = labelled.groupby(["benchmark", "category", "method"], sort=False)["correct"].agg(["size", "sum"])
    return [CategoryAccuracy(benchmark=b, category=c, method=m, n=int(n), correct=int(k), accuracy=float(k / n))
            for (b, c, m), (n, k) in grouped.iterrows()]
