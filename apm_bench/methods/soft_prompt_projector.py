"""The soft prompt's projector: φ(history) → m virtual tokens of the model's hidden size.

Its own module so that torch loads only when a projector is built or read, not whenever the
soft-prompt method is registered.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"


class SoftPromptProjector(nn.Module):
    """φ(history) → Linear → tanh or GELU → Linear → m tokens of the model's hidden size; the output
    layer starts at zero, so an untrained projector adds nothing but a zero token."""

    def __init__(self, input_dim: int, hidden: int, tokens: int, width: int, seed: int = 0, activation: str = "tanh") -> None:
        super().__init__()
        self.shape = {"input_dim": input_dim, "hidden": hidden, "tokens": tokens, "width": width, "activation": activation}
        self.activation = nn.GELU() if activation == "gelu" else nn.Tanh()
        generator = torch.Generator().manual_seed(seed)
        self.inner = nn.Linear(input_dim, hidden)
        self.outer = nn.Linear(hidden, tokens * width)
        with torch.no_grad():
            self.inner.weight.copy_(torch.randn(hidden, input_dim, generator=generator) / input_dim**0.5)
            self.inner.bias.zero_()
            self.outer.weight.zero_()
            self.outer.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.outer(self.activation(self.inner(features)))
        return out.view(len(features), self.shape["tokens"], self.shape["width"])

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / PROJECTOR_WEIGHTS))
        (directory / PROJECTOR_CONFIG).write_text(json.dumps(self.shape, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> SoftPromptProjector:
        from safetensors.torch import load_file

        projector = cls(**json.loads((directory / PROJECTOR_CONFIG).read_text(encoding="utf-8")))  # older ones: tanh
        projector.load_state_dict(load_file(str(directory / PROJECTOR_WEIGHTS)))
        return projector
