"""P-tuning's config: PEFT's `PromptEncoderConfig` field names, defaults and meanings.

P-tuning (Liu et al. 2021, "GPT Understands, Too", §3) prepends `num_virtual_tokens` embeddings to
the input, as prompt tuning does, but makes them with a small trained network (an MLP, or a
bidirectional LSTM then an MLP) from free embeddings h: P = f(h). The adapter file holds P, the
network's output, as PEFT saves it.
"""

from __future__ import annotations

import enum
import warnings
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from peftctl.adapters.config import READING_SAVED
from peftctl.adapters.prompt_config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's `PromptEncoderConfig`."""

    peft_type: ClassVar[str] = "P_TUNING"
    prefix: ClassVar[str] = "prompt_embeddings"

    method: Literal["p_tuning"] = Field(default="p_tuning", description="Adapter method.")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        default="MLP",
        description=(
            "The encoder: MLP (Linear-ReLU-Linear-ReLU-Linear through encoder_hidden_size) or LSTM (a "
            "bidirectional LSTM of encoder_num_layers layers, then Linear-ReLU-Linear)."
        ),
    )
    encoder_hidden_size: int | None = Field(
        default=None, ge=1, description="The encoder's hidden size; unset: the model's hidden size (token_dim).")
    encoder_num_layers: int = Field(
        default=2, ge=1, description="The LSTM's number of layers (the MLP always has 3 linear layers, as in PEFT).")
    encoder_dropout: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Dropout between the LSTM's layers (LSTM only, as in PEFT).")

    @model_validator(mode="after")
    def _mlp_layers(self):
        if (self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2
                and not READING_SAVED.get()):
            warnings.warn("for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used.",
                          UserWarning, stacklevel=2)
        # PEFT ignores encoder_dropout with MLP silently: refused in a new config, accepted from a file.
        if self.encoder_reparameterization_type == "MLP" and self.encoder_dropout and not READING_SAVED.get():
            raise ValueError("encoder_dropout is only used with encoder_reparameterization_type LSTM (between the "
                             "LSTM's layers; PEFT's MLP has no dropout and would ignore it): leave it unset")
        return self


CONFIG_CLASS = PromptEncoderConfig
