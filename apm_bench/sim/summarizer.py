"""The simulator's preference summarizer: a trainable policy over statements from the catalog.

A summary is `SUMMARY_LENGTH` statements. Two kinds exist:
- attribute statements ("This user writes in a very anxious way."): what an untrained model
  describes from the history; they name no response principle, so they earn little under C;
- preference statements ("This user likes gentle answers." / "This user dislikes gentle
  answers."): the generator reads these through the principle keywords.

logits = base_map · h + adapter · h, with h = [evidence for each attribute's follow side, for its
avoid side, 1]. The base map describes the detected attributes and adds stereotyped preference
statements (as an untrained LLM would); a zero-initialised adapter is what preference
optimisation trains, and it can learn the world's hidden mapping.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from apm_bench.world.catalog import Attribute, Principle

SUMMARY_LENGTH = 2
DESCRIBE_STRENGTH = 3.0
STEREOTYPE_STRENGTH = 1.5


def statements(principles: list[Principle], attributes: list[Attribute]) -> list[str]:
    preference = [
        f"This user {'likes' if side == 'follow' else 'dislikes'} {p.keywords[0]} answers."
        for side in ("follow", "avoid")
        for p in principles
    ]
    describing = [
        f"This user writes in a {'very' if side == 'follow' else 'not at all'} {a.name.lower()} way."
        for side in ("follow", "avoid")
        for a in attributes
    ]
    return preference + describing


class SimSummarizer(nn.Module):
    def __init__(self, principles: list[Principle], attributes: list[Attribute]) -> None:
        super().__init__()
        self.statements = statements(principles, attributes)
        self.writing = [(a.follow.description, a.avoid.description) for a in attributes]
        n_p, n_a = len(principles), len(attributes)
        self.width = 2 * n_a + 1
        base = torch.full((len(self.statements), self.width), 0.0)
        index = {p.id: i for i, p in enumerate(principles)}
        for a, attribute in enumerate(attributes):
            base[2 * n_p + a, a] = DESCRIBE_STRENGTH  # very X
            base[2 * n_p + n_a + a, n_a + a] = DESCRIBE_STRENGTH  # not at all X
            for principle, weight in attribute.stereotype.items():
                if principle not in index:
                    continue
                p = index[principle]
                follow, avoid = (p, n_p + p) if weight > 0 else (n_p + p, p)
                base[follow, a] += STEREOTYPE_STRENGTH * abs(weight)
                base[avoid, n_a + a] += STEREOTYPE_STRENGTH * abs(weight)
        self.register_buffer("base_map", base)
        self.adapters = nn.ParameterDict()

    def describe_writing(self, evidence: np.ndarray, temperature: float, rng: np.random.Generator) -> str:
        """Catalog descriptions of attribute sides, drawn as POPI's untrained summaries are: each
        side with evidence has logit DESCRIBE_STRENGTH × its share of the strongest evidence, every
        other side 0, sampled SUMMARY_LENGTH times at the request's temperature. So a description
        names the salient trait often, not always, and at temperature 0 names it every time."""
        n = len(evidence)
        strength = np.abs(evidence) / max(float(np.abs(evidence).max()), 1.0)
        logits = np.zeros(2 * n)
        logits[np.arange(n) + np.where(evidence > 0, 0, n)] = DESCRIBE_STRENGTH * strength
        probs = torch.softmax(torch.as_tensor(logits) / max(temperature, 1e-4), dim=-1).numpy().astype(float)
        picks = rng.choice(2 * n, size=SUMMARY_LENGTH, replace=True, p=probs / probs.sum())
        return " ".join(dict.fromkeys(self.writing[i % n][i // n] for i in picks))

    def describe_preference(self, signal: np.ndarray, threshold: float = 0.05) -> str:
        """Preference statements for the principle whose markers differ most between the best and the
        worst answer, and for up to SUMMARY_LENGTH − 1 more that differ nearly as much."""
        n_p = len(signal)
        order = [int(i) for i in np.argsort(-np.abs(signal), kind="stable") if abs(signal[i]) > threshold][:SUMMARY_LENGTH]
        if not order:
            return "This user shows no clear preference."
        order = [i for i in order if abs(signal[i]) >= 0.5 * abs(signal[order[0]])]  # a weak second difference is noise
        return " ".join(self.statements[i if signal[i] > 0 else n_p + i] for i in order)

    def features(self, evidence: np.ndarray) -> torch.Tensor:
        """h from signed attribute evidence (one row per request)."""
        e = torch.as_tensor(evidence, dtype=torch.float32)
        return torch.cat([e.clamp(min=0), (-e).clamp(min=0), torch.ones(len(e), 1)], dim=1)

    def add_adapter(self, name: str) -> nn.Parameter:
        self.adapters[name] = nn.Parameter(torch.zeros(len(self.statements), self.width))
        return self.adapters[name]

    def log_probs(self, h: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
        logits = h @ self.base_map.T
        for name in dict.fromkeys(a for a in adapters if a is not None):  # one update per adapter, not per row
            rows = torch.tensor([i for i, a in enumerate(adapters) if a == name])
            logits = logits.index_add(0, rows, h[rows] @ self.adapters[name].T)
        return torch.log_softmax(logits, dim=-1)

    def sample(self, log_probs: torch.Tensor, temperature: float, rng: np.random.Generator) -> str:
        probs = torch.softmax(log_probs / max(temperature, 1e-4), dim=-1).detach().numpy().astype(float)
        picks = rng.choice(len(self.statements), size=SUMMARY_LENGTH, replace=True, p=probs / probs.sum())
        return " ".join(dict.fromkeys(self.statements[i] for i in picks))

    def summary_log_prob(self, log_probs: torch.Tensor, summary: str) -> torch.Tensor:
        """Sum of the log-probabilities of the statements a summary contains (unknown text: none)."""
        present = [i for i, s in enumerate(self.statements) if s in summary]
        if not present:
            return log_probs.new_tensor(-50.0)
        return log_probs[present].sum()
