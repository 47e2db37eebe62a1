"""The policy's arithmetic without gradients, in numpy: the frozen base map, level distributions,
sampling and log-probabilities.

Answering requests needs no gradients, so a run whose methods train nothing on the simulator
(routing, rag, history, the baselines) never loads torch, which is a second of every cold run.
`sim/policy.py` builds its torch module from the same base map and computes the same
distributions with gradients for training; tests/test_sim.py holds the two together.
"""

from __future__ import annotations

import numpy as np

from apm_bench.sim.profile import SimProfile
from apm_bench.sim.style import LEVELS
from apm_bench.world.catalog import Attribute, Principle

_LEVELS = LEVELS.astype(np.float32)


def base_map(profile: SimProfile, principles: list[Principle], attributes: list[Attribute], feature_width: int) -> np.ndarray:
    """(principles, features): how each feature pushes each principle in the pretrained model."""
    n_p = len(principles)
    if feature_width != 3 * n_p + len(attributes) + 1:
        raise ValueError("feature width does not match the principle and attribute pools")
    base = np.zeros((n_p, feature_width), dtype=np.float32)
    eye = np.eye(n_p, dtype=np.float32)
    base[:, :n_p] = profile.instruction * eye
    base[:, n_p : 2 * n_p] = profile.keyword * eye
    base[:, 2 * n_p : 3 * n_p] = profile.imitation * eye
    principle_index = {p.id: i for i, p in enumerate(principles)}
    for a_index, attribute in enumerate(attributes):
        for principle_id, weight in attribute.stereotype.items():
            if principle_id in principle_index:
                base[principle_index[principle_id], 3 * n_p + a_index] = profile.stereotype * weight
    base[:, -1] = [profile.lean.get(p.id, 0.0) for p in principles]
    return base


def level_log_probs(push: np.ndarray, stickiness: float, temperatures: np.ndarray) -> np.ndarray:
    """(batch, principles, levels) log-probabilities, one temperature per row."""
    logits = -np.float32(stickiness) * np.abs(_LEVELS) + push[..., None].astype(np.float32) * _LEVELS
    logits = logits / np.maximum(np.asarray(temperatures, dtype=np.float32), np.float32(1e-4))[:, None, None]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_levels(log_probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling with caller-supplied uniforms, so each request's seed fixes its draw."""
    cumulative = np.exp(log_probs).cumsum(axis=-1)
    index = (uniforms[..., None] > cumulative).sum(axis=-1)
    return LEVELS[np.minimum(index, len(LEVELS) - 1)]


def style_log_prob(log_probs: np.ndarray, styles: np.ndarray) -> np.ndarray:
    """log π(z | context) summed over principles; styles hold levels in {−2..2}."""
    index = (np.asarray(styles, dtype=int) + int(-LEVELS.min()))[..., None]
    return np.take_along_axis(log_probs, index, axis=-1)[..., 0].sum(axis=-1)
