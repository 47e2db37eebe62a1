"""`apm judge calibrate`: rate responses on both words of every antonym pair and measure how far
the judge is from antonym consistency (s⁺ + s⁻ = 11), in the paper's judge-study format.

Responses are written by the generator under random FOLLOW/AVOID instructions, so they span
styles. Each pair gets its own responses (n per pair), rated on both of its words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apm_bench.backends.base import Backend, GenerationRequest, chat
from apm_bench.errors import CatalogError
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIN, Judge, Rating, RatingRequest, flip_for_side
from apm_bench.sim.style import stable_seed
from apm_bench.world.catalog import AntonymCatalog, Catalog, Principle, PrincipleMarkers
from apm_bench.world.prompting import style_instruction
from apm_bench.world.prompts import NeutralPrompt

_RUBRIC = "1: the response clearly shows the opposite.\n5-6: neither.\n10: a perfect example."


def antonym_principles(antonyms: AntonymCatalog) -> list[Principle]:
    """Each antonym word as a one-sided 'principle' an LLM judge can be asked about."""
    markers = PrincipleMarkers(follow_markers=["-", "--", "---"], avoid_markers=["=", "==", "==="])
    return [
        Principle(
            id=word, name=word.capitalize(), description=antonyms.descriptions[word], rubric=_RUBRIC,
            follow_instruction=f"Write a {word} response.", avoid_instruction=f"Do not write a {word} response.",
            keywords=[word], sim=markers,
        )
        for pair in antonyms.pairs
        for word in pair
    ]


class SimProxyJudge(Judge):
    """Rates an antonym word with the simulator's judge through the word's proxy principle.

    `leniency` is added to the word's final score, as a judge that likes to rate high does to
    both words of a pair; that is what the balance error |s⁺ + s⁻ − 11| detects.
    """

    def __init__(self, inner: Judge, antonyms: AntonymCatalog, leniency: float = 0.0) -> None:
        missing = [w for pair in antonyms.pairs for w in pair if w not in antonyms.sim_proxies]
        if missing:
            raise CatalogError(f"antonyms.yaml has no sim_proxies for {missing}; the simulator's judge cannot rate them")
        self.inner = inner
        self.proxies = antonyms.sim_proxies
        self.leniency = leniency
        self.name = inner.name

    def rate(self, requests: Sequence[RatingRequest]) -> list[Rating]:
        proxied = [
            RatingRequest(r.prompt, r.response, self.proxies[r.principle][0], stable_seed(r.seed, r.principle))
            for r in requests
        ]
        ratings = self.inner.rate(proxied)
        return [
            Rating(self._lenient(flip_for_side(g.score, self.proxies[r.principle][1]))) if g.score is not None else g
            for r, g in zip(requests, ratings)
        ]

    def _lenient(self, score: float) -> float:
        return float(np.clip(score + self.leniency, SCORE_MIN, SCORE_MAX))


def calibration_scores(
    catalog: Catalog,
    prompts: list[NeutralPrompt],
    generator: Backend,
    judge: Judge,
    per_pair: int,
    seed: int = 0,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """scores (pairs, 2, per_pair); failed ratings become NaN (and are reported by the caller)."""
    if catalog.antonyms is None:
        raise CatalogError("the principles folder has no antonyms.yaml")
    pairs = [tuple(p) for p in catalog.antonyms.pairs]
    rng = np.random.default_rng([seed, 0xCA1])
    scores = np.full((len(pairs), 2, per_pair), np.nan)
    for p_index, pair in enumerate(pairs):
        picks = rng.choice(len(prompts), size=per_pair, replace=per_pair > len(prompts))
        requests = []
        for n, prompt_index in enumerate(picks):
            principle = catalog.principles[int(rng.integers(len(catalog.principles)))]
            side = "follow" if rng.random() < 0.5 else "avoid"
            requests.append(GenerationRequest(
                chat(prompts[prompt_index].text, system=style_instruction(principle, side)),
                seed=stable_seed("calibrate", seed, p_index, n),
            ))
        responses = generator.generate(requests)
        for w_index, word in enumerate(pair):
            ratings = judge.rate([
                RatingRequest(r.messages[-1].content, g.text, word, seed=stable_seed(seed, p_index, n))
                for n, (r, g) in enumerate(zip(requests, responses))
            ])
            scores[p_index, w_index] = [np.nan if x.score is None else x.score for x in ratings]
    return scores, [(a, b) for a, b in pairs]


def judge_file_name(judge_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in judge_name)


def calibration_path(out_dir: Path, judge_name: str) -> Path:
    return Path(out_dir) / f"{judge_file_name(judge_name)}.npz"


def complete_columns(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep, per pair, the responses rated on both words, truncated to a common count.

    The score-file format needs the same n for every pair; failed ratings are dropped, never
    filled in, and the number of dropped responses is returned so the caller can report it.
    """
    kept = [pair[:, ~np.isnan(pair).any(axis=0)] for pair in scores]
    n = min(k.shape[1] for k in kept)
    dropped = int(sum(k.shape[1] for k in kept) - n * len(kept) + np.isnan(scores).any(axis=1).sum())
    return np.stack([k[:, :n] for k in kept]), dropped


def calibrate(
    judge_model: str,
    judge_backend: str | None,
    judge_url: str | None,
    weighted: bool,
    sim_bias: float,
    sim_noise: float,
    model: str,
    per_pair: int,
    seed: int,
    out_dir: Path,
) -> tuple[Path, int]:
    """Build the engines, rate, and save `<judge>.npz` in the reference format; returns (path, dropped)."""
    from apm_bench.backends import load_backend
    from apm_bench.judging.analysis import save_judge_scores
    from apm_bench.judging.llm_judge import LLMJudge, LLMJudgeConfig
    from apm_bench.judging.sim_judge import SimJudge, SimJudgeConfig
    from apm_bench.world.catalog import load_catalog
    from apm_bench.world.prompts import load_prompts

    catalog = load_catalog().default_pool()
    if catalog.antonyms is None:
        raise CatalogError("the principles folder has no antonyms.yaml")
    generator = load_backend(model, catalog)
    judge: Judge
    if judge_model == "sim-judge" and judge_backend is None:
        sim_config = SimJudgeConfig(noise=sim_noise, weighted=weighted)
        judge = SimProxyJudge(SimJudge(catalog.principles, sim_config), catalog.antonyms, leniency=sim_bias)
        name = f"sim-judge_bias{sim_bias:g}_noise{sim_noise:g}" + ("_weighted" if weighted else "")
    else:
        options = {"base_url": judge_url} if judge_url else {}
        backend = load_backend(judge_model, catalog, backend=judge_backend, options=options)
        judge = LLMJudge(backend, antonym_principles(catalog.antonyms), LLMJudgeConfig(weighted=weighted))
        name = judge_model + ("_weighted" if weighted else "")
    scores, pairs = calibration_scores(catalog, load_prompts(), generator, judge, per_pair, seed)
    complete, dropped = complete_columns(scores)
    path = calibration_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_judge_scores(path, complete, pairs)
    return path, dropped
