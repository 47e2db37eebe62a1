"""Preference optimisation of adapters, shared by every method that trains and every backend that
can: a backend that trains exposes `add_adapter`, `adapter_parameters(name)` and
`sequence_logprob(requests, responses)` (with gradients). The reference policy is the same model
with the adapter off, so no second copy of the model is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apm_bench.backends.base import AdapterRef, Backend, GenerationRequest


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """−log σ(β · ((π_c − ref_c) − (π_r − ref_r))), averaged over pairs (log-probabilities in)."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()


@dataclass(frozen=True)
class PreferencePair:
    request: GenerationRequest
    chosen: str
    rejected: str


@dataclass
class TrainingRecord:
    steps: int
    examples: int
    losses: list[float]


def can_train(backend: Backend) -> bool:
    return backend.capabilities.trainable and hasattr(backend, "sequence_logprob")


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
) -> TrainingRecord:
    """Train the (already added) adapter `adapter` by DPO on the pairs; returns the loss curve.

    `sft_weight` adds the negative log-likelihood of the chosen responses (as in RPO): plain DPO
    only separates chosen from rejected and may do so by lowering both; the extra term makes
    the chosen ones likely, which matters when few samples carry the signal.
    """
    parameters = backend.adapter_parameters(adapter)  # type: ignore[attr-defined]
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    with_adapter = [dataclasses.replace(p.request, adapter=AdapterRef(adapter)) for p in pairs]
    without = [dataclasses.replace(p.request, adapter=None) for p in pairs]
    chosen = [p.chosen for p in pairs]
    rejected = [p.rejected for p in pairs]
    with torch.no_grad():
        reference_chosen = backend.sequence_logprob(without, chosen)  # type: ignore[attr-defined]
        reference_rejected = backend.sequence_logprob(without, rejected)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            policy_chosen = backend.sequence_logprob([with_adapter[i] for i in batch], [chosen[i] for i in batch])  # type: ignore[attr-defined]
            policy_rejected = backend.sequence_logprob([with_adapter[i] for i in batch], [rejected[i] for i in batch])  # type: ignore[attr-defined]
            loss = dpo_loss(policy_chosen, policy_rejected, reference_chosen[batch], reference_rejected[batch], beta)
            if sft_weight:
                loss = loss - sft_weight * policy_chosen.mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            steps += 1
    return TrainingRecord(steps=steps, examples=len(pairs), losses=losses)
