"""`apm tiny-model build-judge`: apm-tiny-judge, apm-tiny fine-tuned to rate as `sim-judge` rates.

apm-tiny already learned the judge's requests among everything else it writes, yet its scores
do not follow sim-judge's (Pearson 0.005 on `apm judge agreement`): one rating in nine of its
corpus is too little for four layers to learn to find a principle's phrases in a 300-token
request. A sibling trained on ratings alone starts from apm-tiny's weights, which already read
the simulator's phrases, and spends every step on the score token. It ships beside apm-tiny as
its own folder with its own manifest, so a run can put the judge on a real engine too.

Only trainable prompts are used (the answers are sim-large's to prompts evaluation never shows a
test user); `apm judge agreement` then measures the judge on the held-out ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apm_bench.errors import ConfigError
from apm_bench.judging.judge import SCORE_MAX, SCORE_MIN
from apm_bench.tiny.build import bundled_folder, training_summary, verify, write_model_folder
from apm_bench.tiny.corpus import Example, held_out_prompts, judge_examples, plain_examples
from apm_bench.tiny.model import ANSWER_END
from apm_bench.tiny.training import TrainingConfig, encode, train

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

#: the judge's own training: the score token only (no loss on the request), no first lesson, a
#: gentler rate than from scratch since it starts from apm-tiny's weights
JUDGE_TRAINING = TrainingConfig(steps=6000, tokens_per_batch=2048, learning_rate=5e-4, warmup=50, prompt_weight=0.0,
                                first_lesson=0)


class JudgeBuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, ge=0)
    teacher: str = Field(default="sim-large", description="writes the answers the judge learns to rate")
    answers: int = Field(default=8000, ge=1, description="teacher answers to trainable prompts (none, FOLLOW or AVOID)")
    ratings: int = Field(default=16000, ge=1, description="rubric requests over those answers, with sim-judge's score")
    validation: int = Field(default=300, ge=10, description="ratings of other answers, never trained on, that "
                                                           "the build reports its agreement on")
    training: TrainingConfig = Field(default_factory=lambda: JUDGE_TRAINING)


def rating_examples(teacher: str, answers: int, ratings: int, seed: int) -> list[Example]:
    """Judge requests over the teacher's answers to trainable prompts, answered with sim-judge's
    score (`judge_examples` picks the principles as a run's judging does)."""
    trainable, _ = held_out_prompts()
    written = plain_examples(teacher, trainable, answers, seed)
    return judge_examples([e.answer for e in written], [e.messages[-1][1] for e in written], ratings, seed)


def score_tokens(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The token that opens each score 1..10; the weighted judge reads its probabilities, so each
    score must be one token of its own."""
    ids = [tokenizer(str(s) + ANSWER_END, add_special_tokens=False)["input_ids"][0] for s in range(SCORE_MIN, SCORE_MAX + 1)]
    if len(set(ids)) != len(ids):
        raise ConfigError("the base model's tokenizer does not give each score 1..10 a token of its own")
    return ids


def expected_scores(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: list[Example],
                    batch: int = 16) -> np.ndarray:
    """Each request's expected score under the model's first answer token (as `--judge-weighted` rates)."""
    import torch

    tokens = torch.tensor(score_tokens(tokenizer))
    values = torch.arange(SCORE_MIN, SCORE_MAX + 1, dtype=torch.float32)
    prompts = [encode(tokenizer, e) for e in examples]
    scores: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            rows = prompts[start:start + batch]
            width = max(r.answer_start for r in rows)
            ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):  # left-padded, so every request's last position is its answer's first
                ids[i, width - row.answer_start:] = torch.tensor(row.ids[:row.answer_start])
                mask[i, width - row.answer_start:] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
            probabilities = torch.softmax(logits[:, tokens], dim=-1)
            scores.extend((probabilities * values).sum(dim=-1).tolist())
    model.train(was_training)
    return np.asarray(scores)


def agreement(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> float:
    """Pearson correlation of the model's expected scores with sim-judge's."""
    target = np.asarray([float(e.answer) for e in examples])
    found = expected_scores(model, tokenizer, examples)
    if found.std() == 0 or target.std() == 0:
        return 0.0
    return float(np.corrcoef(found, target)[0, 1])


def build_judge(config: JudgeBuildConfig, out: Path, base: Path | None = None,
                report: Callable[[str], None] = lambda line: None) -> dict:
    """Fine-tune the apm-tiny in `base` (default: the shipped one) on ratings; write apm-tiny-judge to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = base or bundled_folder()
    base_manifest = verify(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    score_tokens(tokenizer)  # a base it cannot read scores from stops here, before any work
    started = time.perf_counter()
    examples = rating_examples(config.teacher, config.answers, config.ratings, config.seed)
    held = rating_examples(config.teacher, max(1, config.validation // 2), config.validation, config.seed + 1)
    times = {"corpus_s": time.perf_counter() - started}
    report(f"corpus: {len(examples)} ratings of {config.answers} answers; {len(held)} held for validation")

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = agreement(model, tokenizer, held)
    report(f"validation Pearson before training: {before:.3f}")
    mark = time.perf_counter()
    log = train(model, tokenizer, examples, config.training, report,
                check=lambda: f"validation Pearson {agreement(model, tokenizer, held):.3f}")
    times["training_s"] = time.perf_counter() - mark
    return write_model_folder(model, tokenizer, out, {
        "model": "apm-tiny-judge",
        "base": {"model": base_manifest.get("model", "apm-tiny"), "checksum": base_manifest["checksum"]},
        "build": config.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"ratings": len(examples), "answers": config.answers, "left_out_as_too_long": log.left_out},
        "validation": {"ratings": len(held), "pearson_before": round(before, 4),
                       "pearson": round(agreement(model, tokenizer, held), 4)},
        "training": training_summary(log),
    }, times, started)
