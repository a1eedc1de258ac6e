"""IA3 plus a penalty `pull * sum((l - 1)^2)` added to the loss through the training hooks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from peftctl.adapters.ia3.config import IA3Config


class HookedIA3Config(IA3Config):
    """IA3 whose vectors are pulled towards 1 by a loss term (a test of the loop's hooks)."""

    peft_type: ClassVar[str] = "IA3_HOOKED"
    method: Literal["ia3_hooked"] = Field(default="ia3_hooked", description="Adapter method.")
    pull: float = Field(default=0.0, ge=0, description="Weight of the loss term pull * sum((l - 1)^2).")


CONFIG_CLASS = HookedIA3Config
