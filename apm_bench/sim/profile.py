"""A simulated model's character: how strongly it reacts to each kind of cue (models.yaml's `sim`).

Apart from the policy that acts on it, so a model alias resolves without loading torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SimProfile(BaseModel):
    """How strongly a simulated model of a given size reacts to each kind of cue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: float = Field(ge=0, description="push from an explicit FOLLOW/AVOID instruction")
    keyword: float = Field(ge=0, description="push from free-text preference talk")
    imitation: float = Field(ge=0, description="push from the measured style of preferred examples")
    stereotype: float = Field(ge=0, description="push from attribute phrases through stereotypical associations")
    stickiness: float = Field(gt=0, default=2.0, description="how strongly the model keeps its default level 0")
    lean: dict[str, float] = Field(default_factory=dict, description="the model's default style per principle")
    hidden_size: int = Field(gt=0, default=32, description="width of soft-prompt tokens")
