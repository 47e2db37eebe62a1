"""Preference optimisation of adapters and soft prompts, shared by every method that trains and
every backend that can.

A backend that trains (`sim`, `hf`) exposes `create_adapter(name, rank)`, `adapter_parameters(name)`,
`save_adapter(name, directory)`, `response_length(responses)`, `soft_prompt_width` and
`sequence_logprob(requests, responses)` with gradients. The reference policy is the same model
with the adapter off and no soft prompt, so no second copy of the model is kept.

Losses (log-probabilities in, a scalar out):
- DPO:    −log σ(β·((π_c − ref_c) − (π_r − ref_r)))
- SimPO:  −log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ)                      (no reference)
- C-BPO:  E_tar[l(g,+1)] + (1/π_n)·max(0, E_aux[l(g,−1)] − π_p·E_tar[l(g,−1)])
          with g = β·(π − ref) minus a running mean, l(g, y) = log(1 + e^{−y·g}), π_n = 1 − π_p.
          Without the clamp the max is dropped; π_p = 0 is the uncorrected control (aux = negatives).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from apm_bench.backends.base import AdapterRef, Backend, GenerationRequest

if TYPE_CHECKING:  # torch loads when something trains or simulates, not on import
    import torch
    import torch.nn.functional as F


PreferenceLoss = Literal["dpo", "simpo"]
Report = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- losses


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    import torch.nn.functional as F

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """Length-normalised log-probabilities with a target margin γ; needs no reference model."""
    import torch.nn.functional as F

    margin = beta * (policy_chosen / chosen_lengths - policy_rejected / rejected_lengths) - gamma
    return -F.logsigmoid(margin).mean()


def logistic_loss(g: torch.Tensor, label: int) -> torch.Tensor:
    """l(g, y) = log(1 + exp(−y·g)), elementwise."""
    import torch.nn.functional as F

    return F.softplus(-label * g)


def cbpo_loss(target: torch.Tensor, auxiliary: torch.Tensor, positive_prior: float, clamp: bool = True) -> torch.Tensor:
    """The C-BPO positive-unlabeled risk of implicit rewards g on target (positive) and auxiliary
    (unlabeled) responses. The auxiliary set also holds responses the target users would like; the
    π_p term removes their share from the negative risk so shared good behaviour is not punished.
    """
    import torch

    if not 0.0 <= positive_prior < 1.0:
        raise ValueError(f"the positive prior must be in [0, 1), got {positive_prior}")
    positive_risk = logistic_loss(target, +1).mean()
    negative_risk = logistic_loss(auxiliary, -1).mean() - positive_prior * logistic_loss(target, -1).mean()
    if clamp:
        negative_risk = torch.clamp(negative_risk, min=0.0)
    return positive_risk + negative_risk / (1.0 - positive_prior)


class RunningMean:
    """The reference point subtracted from implicit rewards: an exponential mean of past batches.

    Without it g is judged against 0, and a policy that raises every response's likelihood (or
    lowers all) would move the loss without learning which responses are preferred.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.value: float | None = None

    def center(self, values: torch.Tensor) -> torch.Tensor:
        batch_mean = float(values.detach().mean())
        self.value = batch_mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * batch_mean
        return values - self.value


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainingRecord:
    """What one training run cost and how its loss went; kept in the run record and plotted."""

    name: str
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    reused: bool = False

    def cost(self) -> dict[str, float]:
        return {"training_steps": float(self.steps), "training_examples": float(self.examples),
                "training_seconds": round(self.seconds, 3)}


def optimise(
    name: str,
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: Callable[[list[int]], torch.Tensor],
    n_examples: int,
    settings: OptimiserSettings,
    report: Report | None = None,
) -> TrainingRecord:
    """Adam (or AdamW) over shuffled mini-batches of example indices, `grad_accum` batches per
    step, gradients clipped to `clip` if set; reports progress every tenth of the run.

    `record.steps` counts optimiser steps and `record.losses` holds one loss per mini-batch.
    """
    import torch

    if n_examples == 0:
        raise ValueError(f"{name}: nothing to train on")
    parameters = list(parameters)
    kind = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    optimiser = kind(parameters, lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    record = TrainingRecord(name=name, examples=n_examples)
    batches = -(-n_examples // settings.batch_size)
    total = settings.epochs * -(-batches // settings.grad_accum)
    started = time.perf_counter()
    for _ in range(settings.epochs):
        order = torch.randperm(n_examples, generator=generator).tolist()
        optimiser.zero_grad()
        for index, start in enumerate(range(0, n_examples, settings.batch_size)):
            loss = batch_loss(order[start : start + settings.batch_size])
            (loss / settings.grad_accum).backward()
            record.losses.append(float(loss.detach()))
            if (index + 1) % settings.grad_accum and index + 1 < batches:
                continue
            if settings.clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_norm=settings.clip)
            optimiser.step()
            optimiser.zero_grad()
            record.steps += 1
            if report is not None and (record.steps % max(total // 10, 1) == 0 or record.steps == total):
                report(f"training {name}: step {record.steps}/{total}, loss {record.losses[-1]:.4f}")
    record.seconds = time.perf_counter() - started
    return record


def can_train(backend: Backend) -> bool:
    return backend.capabilities.trainable and hasattr(backend, "sequence_logprob")


def reference_logprobs(backend: Any, requests: Sequence[GenerationRequest], responses: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """log π_ref(response | request): adapter off, no soft prompt, no gradients."""
    import torch

    plain = [dataclasses.replace(r, adapter=None, soft_prompt=None) for r in requests]
    with torch.no_grad():
        parts = [backend.sequence_logprob(plain[i : i + chunk], list(responses[i : i + chunk])) for i in range(0, len(plain), chunk)]
    return torch.cat(parts).detach() if parts else torch.zeros(0)


# ---------------------------------------------------------------------------------------------- preference pairs


@dataclass(frozen=True)
class PreferencePair:
    request: GenerationRequest
    chosen: str
    rejected: str


@dataclass(frozen=True)
class OptimiserSettings:
    epochs: int = 30
    learning_rate: float = 0.05
    batch_size: int = 64
    seed: int = 0
    optimizer: Literal["adam", "adamw"] = "adam"
    #: mini-batches whose gradients add up to one optimiser step
    grad_accum: int = 1
    #: gradient norm limit (None: no clipping)
    clip: float | None = None


@dataclass(frozen=True)
class PreferenceSettings(OptimiserSettings):
    loss: PreferenceLoss = "dpo"
    beta: float = 0.5
    gamma: float = 0.5
    sft_weight: float = 0.0
    #: score only the first this many tokens of each response (engines with `response_ids`)
    max_response_tokens: int | None = None


def train_preference(
    backend: Any,
    name: str,
    pairs: Sequence[PreferencePair],
    policy_requests: Callable[[list[int]], list[GenerationRequest]],
    parameters: Sequence[torch.nn.Parameter],
    settings: PreferenceSettings,
    report: Report | None = None,
) -> TrainingRecord:
    """Train `parameters` on the pairs; `policy_requests(indices)` builds the batch's requests as the
    trained policy sees them (adapter, soft prompt computed with gradients).

    `sft_weight` adds the negative log-likelihood of the chosen responses (as in RPO): a pairwise
    loss only separates chosen from rejected and may do so by lowering both.
    """
    import torch

    chosen: list[Any] = [p.chosen for p in pairs]
    rejected: list[Any] = [p.rejected for p in pairs]
    if settings.max_response_tokens is not None:
        chosen = backend.response_ids(chosen, settings.max_response_tokens)
        rejected = backend.response_ids(rejected, settings.max_response_tokens)
    requests = [p.request for p in pairs]
    if settings.loss == "dpo":
        reference_chosen = reference_logprobs(backend, requests, chosen)
        reference_rejected = reference_logprobs(backend, requests, rejected)
    else:
        chosen_lengths = torch.tensor(backend.response_length(chosen), dtype=torch.float32).clamp_min(1.0)
        rejected_lengths = torch.tensor(backend.response_length(rejected), dtype=torch.float32).clamp_min(1.0)

    def batch_loss(batch: list[int]) -> torch.Tensor:
        batch_requests = policy_requests(batch)
        policy_chosen = backend.sequence_logprob(batch_requests, [chosen[i] for i in batch]).float().cpu()
        policy_rejected = backend.sequence_logprob(batch_requests, [rejected[i] for i in batch]).float().cpu()
        if settings.loss == "dpo":
            loss = dpo_loss(policy_chosen, policy_rejected, reference_chosen[batch].cpu(), reference_rejected[batch].cpu(), settings.beta)
        else:
            loss = simpo_loss(policy_chosen, policy_rejected, chosen_lengths[batch], rejected_lengths[batch], settings.beta, settings.gamma)
        if settings.sft_weight:
            loss = loss - settings.sft_weight * policy_chosen.mean()
        return loss

    return optimise(name, parameters, batch_loss, len(pairs), settings, report)


def train_dpo(
    backend: Backend,
    adapter: str,
    pairs: Sequence[PreferencePair],
    beta: float = 0.5,
    epochs: int = 30,
    learning_rate: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    sft_weight: float = 0.0,
    report: Report | None = None,
) -> TrainingRecord:
    """DPO of one (already created) adapter, the pairs' requests sent through it unchanged otherwise."""
    through_adapter = [dataclasses.replace(p.request, adapter=AdapterRef(adapter)) for p in pairs]
    settings = PreferenceSettings(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed, loss="dpo",
                                  beta=beta, sft_weight=sft_weight)
    parameters = backend.adapter_parameters(adapter)  # type: ignore[attr-defined]
    return train_preference(backend, adapter, pairs, lambda batch: [through_adapter[i] for i in batch], parameters, settings, report)


# ---------------------------------------------------------------------------------------------- C-BPO


@dataclass(frozen=True)
class Example:
    """One rated response and the request it answers."""

    request: GenerationRequest
    response: str
    #: log π_ref(response | request) once computed (`with_references`): C-BPO trains one adapter per
    #: label on the same examples, and the reference model does not change between them
    reference: float | None = None


def with_references(backend: Any, examples: Sequence[Example]) -> list[Example]:
    values = reference_logprobs(backend, [e.request for e in examples], [e.response for e in examples])
    return [dataclasses.replace(e, reference=float(v)) for e, v in zip(examples, values.tolist())]


def _references(backend: Any, examples: Sequence[Example]) -> torch.Tensor:
    import torch

    if all(e.reference is not None for e in examples):
        return torch.tensor([e.reference for e in examples])
    return reference_logprobs(backend, [e.request for e in examples], [e.response for e in examples])


@dataclass(frozen=True)
class CbpoSettings(OptimiserSettings):
    beta: float = 0.5
    positive_prior: float = 0.0
    clamp: bool = True
    momentum: float = 0.9


def train_cbpo(
    backend: Any,
    adapter: str,
    target: Sequence[Example],
    auxiliary: Sequence[Example],
    settings: CbpoSettings,
    report: Report | None = None,
) -> TrainingRecord:
    """Train one adapter with the C-BPO loss. Each step pairs a mini-batch of target examples with
    one of auxiliary examples, cycling through the smaller set, so both sets are seen every epoch.
    """
    import torch

    if not target or not auxiliary:
        raise ValueError(f"{adapter}: C-BPO needs target and auxiliary examples")
    ref_target, ref_auxiliary = _references(backend, target), _references(backend, auxiliary)
    ref = AdapterRef(adapter)
    rng = np.random.default_rng(settings.seed)
    centre = RunningMean(settings.momentum)
    larger = max(len(target), len(auxiliary))

    # each example's request through the adapter, built once rather than once per batch
    target_requests = [dataclasses.replace(e.request, adapter=ref) for e in target]
    auxiliary_requests = [dataclasses.replace(e.request, adapter=ref) for e in auxiliary]

    def implicit_rewards(examples: Sequence[Example], requests: list[GenerationRequest], reference: torch.Tensor,
                         rows: np.ndarray) -> torch.Tensor:
        policy = backend.sequence_logprob([requests[i] for i in rows], [examples[i].response for i in rows]).float().cpu()
        return settings.beta * (policy - reference[rows])

    def batch_loss(batch: list[int]) -> torch.Tensor:
        target_rows = np.asarray(batch) % len(target) if len(target) == larger else rng.integers(0, len(target), len(batch))
        auxiliary_rows = np.asarray(batch) % len(auxiliary) if len(auxiliary) == larger else rng.integers(0, len(auxiliary), len(batch))
        g_target = implicit_rewards(target, target_requests, ref_target, target_rows)
        g_auxiliary = implicit_rewards(auxiliary, auxiliary_requests, ref_auxiliary, auxiliary_rows)
        centred = centre.center(torch.cat([g_target, g_auxiliary]))
        return cbpo_loss(centred[: len(g_target)], centred[len(g_target) :], settings.positive_prior, settings.clamp)

    parameters = backend.adapter_parameters(adapter)
    record = optimise(adapter, parameters, batch_loss, larger, settings, report)
    record.examples = len(target) + len(auxiliary)
    return record


def estimate_positive_prior(target_features: np.ndarray, auxiliary_features: np.ndarray, seed: int = 0, ceiling: float = 0.9) -> float:
    """π_p: the share of auxiliary users who are hidden positives, from their histories.

    Elkan & Noto (2008): a classifier learns P(target | history) on target (labelled) versus
    auxiliary (unlabelled) users, out of fold; c = its mean on target users; an auxiliary user with
    score s is a hidden positive with weight (1 − c)/c · s/(1 − s); π_p is the mean weight.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from apm_bench.methods.blas import one_blas_thread

    n_target, n_auxiliary = len(target_features), len(auxiliary_features)
    folds = min(5, n_target, n_auxiliary)
    if folds < 2:
        return 0.0
    features = np.vstack([target_features, auxiliary_features])
    labelled = np.r_[np.ones(n_target), np.zeros(n_auxiliary)]
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with one_blas_thread():
        scores = cross_val_predict(classifier, features, labelled, cv=splitter, method="predict_proba")[:, 1]
    c = float(np.clip(scores[:n_target].mean(), 1e-6, 1 - 1e-6))
    s = np.clip(scores[n_target:], 0.0, 1 - 1e-6)
    weights = np.clip((1 - c) / c * s / (1 - s), 0.0, 1.0)
    return float(np.clip(weights.mean(), 0.0, ceiling))
