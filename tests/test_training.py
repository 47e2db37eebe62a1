"""The shared training code: losses against hand-computed values, the C-BPO correction's effect on
the gradient, the positive-prior estimate, and trainers that move the simulator's policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apm_bench.backends import load_backend
from apm_bench.backends.base import AdapterRef, GenerationRequest, chat
from apm_bench.methods.training import (
    CbpoSettings,
    Example,
    PreferencePair,
    PreferenceSettings,
    RunningMean,
    cbpo_loss,
    dpo_loss,
    estimate_positive_prior,
    simpo_loss,
    train_cbpo,
    train_preference,
    with_references,
)


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_loss_matches_a_hand_computed_value() -> None:
    # margin = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1;  −log σ(0.5 · 1) = log(1 + e^−0.5)
    loss = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert float(loss) == pytest.approx(0.474077, abs=1e-6)
    # two pairs average: the second has margin −1, i.e. log(1 + e^0.5)
    pair_mean = dpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -1.5), t(-1.5, -1.5), beta=0.5)
    assert float(pair_mean) == pytest.approx((0.474077 + 0.974077) / 2, abs=1e-6)


def test_simpo_loss_normalises_by_length_and_subtracts_the_margin() -> None:
    # β·(−4/2 − (−9/3)) − γ = 2·1 − 0.5 = 1.5;  log(1 + e^−1.5)
    loss = simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(0.201413, abs=1e-6)
    # without normalisation the chosen response would look worse (−4 > −9 but per token it is −2 vs −3)
    assert float(simpo_loss(t(-4.0), t(-9.0), t(1.0), t(1.0), beta=2.0, gamma=0.5)) < float(loss)


G_TARGET = (1.0, -0.5)
G_AUX = (0.2, -1.0)


def _hand_cbpo(prior: float, clamp: bool) -> float:
    positive = (softplus(-G_TARGET[0]) + softplus(-G_TARGET[1])) / 2  # l(g, +1) = log(1 + e^−g)
    auxiliary_negative = (softplus(G_AUX[0]) + softplus(G_AUX[1])) / 2  # l(g, −1) = log(1 + e^g)
    target_negative = (softplus(G_TARGET[0]) + softplus(G_TARGET[1])) / 2
    negative = auxiliary_negative - prior * target_negative
    if clamp:
        negative = max(0.0, negative)
    return positive + negative / (1 - prior)


@pytest.mark.parametrize(
    ("prior", "clamp", "expected"),
    [
        (0.4, True, 0.974058),  # corrected negative risk 0.198233 > 0: the clamp does nothing
        (0.4, False, 0.974058),
        (0.8, True, 0.643670),  # 0.555700 − 0.8·0.893669 < 0: clamped to 0, only the positive risk is left
        (0.8, False, -0.152505),  # unclamped, the estimate goes negative (the overfitting nnPU prevents)
        (0.0, True, 1.199370),  # the uncorrected control: target = positives, auxiliary = negatives
    ],
)
def test_cbpo_loss_matches_hand_computed_values(prior: float, clamp: bool, expected: float) -> None:
    loss = cbpo_loss(t(*G_TARGET), t(*G_AUX), prior, clamp=clamp)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert float(loss) == pytest.approx(_hand_cbpo(prior, clamp), abs=1e-9)


def test_cbpo_rejects_a_prior_outside_its_range() -> None:
    with pytest.raises(ValueError, match="positive prior"):
        cbpo_loss(t(0.0), t(0.0), 1.0)


def _gradients(prior: float, clamp: bool, target: tuple[float, ...], auxiliary: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    g_target = t(*target).requires_grad_(True)
    g_auxiliary = t(*auxiliary).requires_grad_(True)
    cbpo_loss(g_target, g_auxiliary, prior, clamp=clamp).backward()
    return g_target.grad.numpy(), g_auxiliary.grad.numpy()  # type: ignore[union-attr]


def test_the_correction_changes_the_gradient_when_positives_hide_among_the_unlabeled() -> None:
    target = (1.5, 1.0, 2.0)
    # half of the auxiliary responses are the target users' kind (same implicit reward), half are not
    auxiliary = (1.5, 1.0, 2.0, -1.0, -0.5, -2.0)
    plain_target, plain_aux = _gradients(0.0, True, target, auxiliary)
    corrected_target, corrected_aux = _gradients(0.5, False, target, auxiliary)
    # the correction adds −π_p/π_n · ∂l(g,−1)/∂g on targets: they are pushed up harder, compensating
    # for the push-down their look-alikes receive in the auxiliary set
    expected_extra = np.array([-0.5 / 0.5 * (1 / (1 + math.exp(-g))) / 3 for g in target])
    assert np.allclose(corrected_target - plain_target, expected_extra)
    assert np.all(corrected_target < plain_target)
    # uncorrected, the hidden positives in the auxiliary set are pushed down like true negatives
    assert np.all(plain_aux[:3] > 0)
    # with the clamp, once the corrected negative risk is ≤ 0 the auxiliary set gets no gradient at all
    _, clamped_aux = _gradients(0.9, True, target, auxiliary)
    assert np.allclose(clamped_aux, 0.0) and not np.allclose(plain_aux, 0.0)


def test_running_mean_centres_on_an_exponential_average_of_batches() -> None:
    centre = RunningMean(momentum=0.5)
    assert centre.center(t(1.0, 3.0)).tolist() == [-1.0, 1.0]  # first batch: its own mean (2)
    assert centre.center(t(6.0)).tolist() == [2.0]  # 0.5·2 + 0.5·6 = 4


def test_positive_prior_estimate_finds_the_share_of_hidden_positives() -> None:
    rng = np.random.default_rng(0)
    like = lambda n: rng.normal(1.0, 1.0, size=(n, 8))  # noqa: E731
    unlike = lambda n: rng.normal(-1.0, 1.0, size=(n, 8))  # noqa: E731
    mixed = estimate_positive_prior(like(150), np.vstack([like(90), unlike(210)]), seed=0)
    assert mixed == pytest.approx(0.3, abs=0.1)
    assert estimate_positive_prior(like(150), unlike(300), seed=0) < 0.08
    assert estimate_positive_prior(like(1), unlike(300)) == 0.0  # too few target users to estimate anything


@pytest.fixture
def sim(catalog):  # type: ignore[no-untyped-def]
    return load_backend("sim-large", catalog)


def _examples(sim, catalog, label: str, side: str, n: int, seed: int) -> list[Example]:  # type: ignore[no-untyped-def]
    from apm_bench.world.prompting import style_instruction

    instruction = style_instruction(catalog.principle(label), side)
    prompts = [f"Question {i}: how do tides work?" for i in range(n)]
    texts = [g.text for g in sim.generate([GenerationRequest(chat(p, system=instruction), seed=seed + i) for i, p in enumerate(prompts)])]
    return [Example(GenerationRequest(chat(p), seed=0), text) for p, text in zip(prompts, texts)]


def test_cbpo_training_moves_the_policy_towards_the_target_style(sim, catalog) -> None:  # type: ignore[no-untyped-def]
    principle = catalog.principles[0].id
    target = _examples(sim, catalog, principle, "follow", 24, 0)
    auxiliary = _examples(sim, catalog, principle, "avoid", 24, 100) + _examples(sim, catalog, principle, "follow", 8, 200)
    sim.create_adapter("tgt", rank=4, seed=0)
    record = train_cbpo(sim, "tgt", target, auxiliary, CbpoSettings(positive_prior=0.25, epochs=20, learning_rate=0.05, batch_size=16))
    assert record.steps == 20 * 2 and record.examples == 56
    assert np.mean(record.losses[-5:]) < np.mean(record.losses[:5])
    request = GenerationRequest(chat("How do tides work?"), seed=0)
    follow = sim.codec.levels
    before = [follow(g.text)[0] for g in sim.generate([GenerationRequest(request.messages, seed=s) for s in range(200)])]
    after = [follow(g.text)[0] for g in sim.generate([GenerationRequest(request.messages, seed=s, adapter=AdapterRef("tgt")) for s in range(200)])]
    assert np.mean(after) > np.mean(before) + 0.5


def test_cbpo_trains_the_same_on_references_computed_once(sim, catalog) -> None:  # type: ignore[no-untyped-def]
    """C-BPO's per-label adapters share their examples: references computed once, before any
    adapter exists, must train exactly as references computed inside each training."""
    principle = catalog.principles[0].id
    target = _examples(sim, catalog, principle, "follow", 16, 0)
    auxiliary = _examples(sim, catalog, principle, "avoid", 16, 100)
    referenced = with_references(sim, target + auxiliary)
    assert all(e.reference is not None for e in referenced)
    settings = CbpoSettings(positive_prior=0.25, epochs=3, learning_rate=0.05, batch_size=8)
    sim.create_adapter("inside", rank=4, seed=0)
    sim.create_adapter("once", rank=4, seed=0)
    inside = train_cbpo(sim, "inside", target, auxiliary, settings)
    once = train_cbpo(sim, "once", referenced[:16], referenced[16:], settings)
    assert once.losses == pytest.approx(inside.losses, rel=1e-5, abs=1e-6)


def test_preference_training_with_dpo_and_simpo(sim, catalog) -> None:  # type: ignore[no-untyped-def]
    principle = catalog.principles[1].id
    chosen = _examples(sim, catalog, principle, "follow", 16, 0)
    rejected = _examples(sim, catalog, principle, "avoid", 16, 50)
    pairs = [PreferencePair(c.request, c.response, r.response) for c, r in zip(chosen, rejected)]
    for loss in ("dpo", "simpo"):
        name = f"pref-{loss}"
        parameters = sim.create_adapter(name, rank=4, seed=0)
        through = [GenerationRequest(p.request.messages, 0, adapter=AdapterRef(name)) for p in pairs]
        settings = PreferenceSettings(loss=loss, epochs=15, learning_rate=0.05, batch_size=8)
        record = train_preference(sim, name, pairs, lambda batch: [through[i] for i in batch], parameters, settings)
        assert record.steps == 15 * 2
        assert record.losses[-1] < record.losses[0]
        margin = sim.sequence_logprob(through, [p.chosen for p in pairs]) - sim.sequence_logprob(through, [p.rejected for p in pairs])
        base = [GenerationRequest(p.request.messages, 0) for p in pairs]
        base_margin = sim.sequence_logprob(base, [p.chosen for p in pairs]) - sim.sequence_logprob(base, [p.rejected for p in pairs])
        assert float(margin.detach().mean()) > float(base_margin.detach().mean()) + 1.0
