"""The simulator's generator as a small torch policy over style vectors.

For each principle p the policy puts a categorical distribution over intensity levels l ∈ {−2..2}:

    logit(p, l) = −stickiness · |l| + push_p · l

    push = base_map · features  (default lean, instruction following, imitation, stereotypes)
         + adapter(features)     (LoRA-like: B·A·features, B starts at zero)
         + reader · mean(soft prompt tokens)

The log-probability of a response is the log-probability of its style vector, so preference
losses (DPO, SimPO, C-BPO) train adapters and soft prompts here with the same code as on a real
model. The base map is frozen: it is "the pretrained model". Requests without adapters or soft
prompts are answered by the same arithmetic in numpy (`sim/levels.py`), without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from apm_bench.sim.levels import base_map
from apm_bench.sim.profile import SimProfile
from apm_bench.sim.style import LEVELS
from apm_bench.world.catalog import Attribute, Principle


class StyleAdapter(nn.Module):
    """A low-rank update of the push, initialised to no effect like a LoRA adapter."""

    def __init__(self, feature_width: int, n_principles: int, rank: int = 4, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, feature_width, generator=generator) / feature_width**0.5)
        self.up = nn.Parameter(torch.zeros(n_principles, rank))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.down.T @ self.up.T


class SimPolicy(nn.Module):
    def __init__(
        self,
        profile: SimProfile,
        principles: list[Principle],
        attributes: list[Attribute],
        feature_width: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.profile = profile
        self.n_principles = len(principles)
        self.feature_width = feature_width
        base = torch.from_numpy(base_map(profile, principles, attributes, feature_width))
        self.register_buffer("base_map", base)
        generator = torch.Generator().manual_seed(seed)
        reader = torch.randn(self.n_principles, profile.hidden_size, generator=generator) / profile.hidden_size**0.5
        self.register_buffer("soft_prompt_reader", reader)
        self.register_buffer("levels", torch.tensor(LEVELS, dtype=torch.float32))
        self.adapters = nn.ModuleDict()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, rank: int = 4, seed: int = 0) -> StyleAdapter:
        adapter = StyleAdapter(self.feature_width, self.n_principles, rank=rank, seed=seed)
        self.adapters[name] = adapter
        return adapter

    def save_adapter(self, name: str, path: str) -> None:
        adapter = self.adapters[name]
        torch.save({"rank": adapter.down.shape[0], "state": adapter.state_dict()}, path)

    def load_adapter(self, name: str, path: str) -> StyleAdapter:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        adapter = StyleAdapter(self.feature_width, self.n_principles, rank=int(saved["rank"]))
        adapter.load_state_dict(saved["state"])
        self.adapters[name] = adapter
        return adapter

    # ------------------------------------------------------------------ distributions

    def push(
        self,
        features: torch.Tensor,
        adapters: Sequence[str | None] | None = None,
        soft_prompts: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        push = features @ self.base_map.T
        if adapters is not None:
            for name in {a for a in adapters if a is not None}:
                rows = torch.tensor([i for i, a in enumerate(adapters) if a == name])
                push = push.index_add(0, rows, self.adapters[name](features[rows]))
        if soft_prompts is not None:
            rows = [i for i, s in enumerate(soft_prompts) if s is not None]
            if rows:
                pooled = torch.stack([soft_prompts[i].mean(dim=0) for i in rows])  # type: ignore[union-attr]
                push = push.index_add(0, torch.tensor(rows), pooled @ self.soft_prompt_reader.T)
        return push

    def level_log_probs(self, push: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """(batch, principles, levels) log-probabilities; temperature is a scalar or one per row."""
        logits = -self.profile.stickiness * self.levels.abs() + push.unsqueeze(-1) * self.levels
        scale = torch.as_tensor(temperature, dtype=logits.dtype).clamp_min(1e-4)
        if scale.dim() == 1:
            scale = scale[:, None, None]
        return torch.log_softmax(logits / scale, dim=-1)

    def style_log_prob(self, push: torch.Tensor, styles: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """log π(z | context) summed over principles; styles hold levels in {−2..2}."""
        log_probs = self.level_log_probs(push, temperature)
        index = (styles.long() + int(-LEVELS.min())).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1).sum(dim=-1)
