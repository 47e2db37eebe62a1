"""Training apm-tiny from scratch: next-token loss on the answer, and at a lower weight on the
context (a model that only has to predict answers learns too slowly to read its context), in
batches of similar length.

Deterministic for a seed on a given machine and thread count: the data order comes from numpy's
seeded generator and the weights from torch's; nothing is timed into a decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apm_bench.tiny.corpus import PLAIN, Example
from apm_bench.tiny.model import ANSWER_END

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast



class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=5000, ge=1, description="optimizer steps")
    tokens_per_batch: int = Field(default=1536, ge=64, description="padded tokens per step (small batches, "
                                                                   "many steps: reading the context is learned late)")
    max_train_tokens: int = Field(default=1024, ge=32, description="longer examples are left out of training")
    learning_rate: float = Field(default=1e-3, gt=0)
    warmup: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    prompt_weight: float = Field(
        default=0.5, ge=0, le=1, description="loss weight of the context's tokens relative to the answer's: "
                                             "predicting contexts (examples, histories) teaches the model to read them")
    first_lesson: int = Field(default=1500, ge=0, description="steps on the first lesson's short examples "
                                                              "(kind 'plain') before the whole corpus")
    seed: int = Field(default=0, ge=0)


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    #: where the answer starts: tokens before it carry no loss
    answer_start: int


@dataclass
class TrainingLog:
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    left_out: int

    @property
    def final_loss(self) -> float:
        tail = self.losses[-50:]
        return float(sum(tail) / len(tail)) if tail else math.nan


def encode(tokenizer: PreTrainedTokenizerFast, example: Example) -> Encoded:
    """The ChatML prompt the engines build, then the answer and the end of its turn."""
    messages = [{"role": role, "content": content} for role, content in example.messages]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer + ANSWER_END, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, len(prompt_ids))


def batches(lengths: Sequence[int], tokens_per_batch: int, rng: np.random.Generator, bucket: int = 128) -> list[list[int]]:
    """Random examples of similar length (within `bucket` tokens, so little is padding) per batch,
    each batch within the token budget, the batches in a seeded order. Grouping by exact length
    would fill a batch with one prompt's answers (a candidate writer answers each prompt 2P times)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i] // bucket, rng.random()))
    groups: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for index in order:
        widest_if_added = max(widest, lengths[index])
        if current and widest_if_added * (len(current) + 1) > tokens_per_batch:
            groups.append(current)
            current, widest_if_added = [], lengths[index]
        current.append(index)
        widest = widest_if_added
    if current:
        groups.append(current)
    return [groups[i] for i in rng.permutation(len(groups))]


def _tensors(rows: list[Encoded], pad_id: int, prompt_weight: float):  # type: ignore[no-untyped-def]
    """Right-padded ids, the attention mask, and each position's loss weight (for predicting it)."""
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        weights[i, 1 : row.answer_start] = prompt_weight
        weights[i, row.answer_start : len(row.ids)] = 1.0
        mask[i, : len(row.ids)] = 1
    return ids, weights, mask


def weighted_loss(model: LlamaForCausalLM, ids, weights, mask):  # type: ignore[no-untyped-def]
    """Next-token cross-entropy, each predicted position weighted (context less than answer, padding not at all)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="none").view(ids.shape[0], -1)
    target = weights[:, 1:]
    return (losses * target).sum() / target.sum(), (losses * (target == 1.0)).sum() / (target == 1.0).sum()


def learning_rate(step: int, config: TrainingConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.learning_rate * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: list[Example], config: TrainingConfig,
    report: Callable[[str], None] = lambda line: None, every: int = 250,
    check: Callable[[], str] | None = None,
) -> TrainingLog:
    """Train in place; every `every` steps report the loss and, where given, what `check` measures."""
    import torch

    encoded = [encode(tokenizer, e) for e in examples]
    kept = [e for e in encoded if len(e.ids) <= config.max_train_tokens]
    rng = np.random.default_rng([config.seed, 0x7A1])
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    pad_id = int(tokenizer.pad_token_id)
    log = TrainingLog(steps=0, tokens=0, seconds=0.0, losses=[], left_out=len(encoded) - len(kept))
    lesson = [e for e, example in zip(encoded, examples) if example.kind == PLAIN and len(e.ids) <= config.max_train_tokens]
    queue: list[list[int]] = []
    started = time.perf_counter()
    model.train()
    for step in range(config.steps):
        pool = lesson if step < config.first_lesson and lesson else kept
        if step == config.first_lesson or not queue:
            queue = batches([len(e.ids) for e in pool], config.tokens_per_batch, rng)
        ids, weights, mask = _tensors([pool[i] for i in queue.pop()], pad_id, config.prompt_weight)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss, answer_loss = weighted_loss(model, ids, weights, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log.steps, log.tokens = step + 1, log.tokens + int(mask.sum())
        log.losses.append(float(answer_loss.detach()))
        if (step + 1) % every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - started
            note = f"  {check()}" if check is not None else ""
            report(f"step {step + 1}/{config.steps}  loss {log.final_loss:.3f}  {log.tokens / elapsed:,.0f} tokens/s{note}")
    log.seconds = time.perf_counter() - started
    model.eval()
    return log


def context_use(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> dict[str, float]:
    """The answer loss with each example's own context, with its system message swapped for
    another example's, and with its user message swapped: how much the model reads each. A model
    that ignores its context scores the same on all three."""
    import torch

    def loss(rows: list[Example]) -> float:
        ids, weights, mask = _tensors([encode(tokenizer, r) for r in rows], int(tokenizer.pad_token_id), 0.0)
        with torch.no_grad():
            return float(weighted_loss(model, ids, weights, mask)[1])

    shifted = examples[1:] + examples[:1]
    own_system = [Example(kind=e.kind, messages=[o.messages[0], *e.messages[1:]], answer=e.answer)
                  for e, o in zip(examples, shifted)]
    own_user = [Example(kind=e.kind, messages=[e.messages[0], *o.messages[1:]], answer=e.answer)
                for e, o in zip(examples, shifted)]
    was_training = model.training
    model.eval()
    result = {"own": loss(examples), "system_swapped": loss(own_system), "user_swapped": loss(own_user)}
    model.train(was_training)
    return {k: round(v, 4) for k, v in result.items()}
