"""Prefix tuning's config: PEFT's `PrefixTuningConfig` field names, defaults and meanings.

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", §4)
gives every attention layer `num_virtual_tokens` trained keys and values that every real token
attends to, as if they were the cached states of a prefix; with `prefix_projection` they are made
from smaller embeddings by a two-layer MLP (§4.3's reparameterization). The adapter file holds the
keys and values themselves (n, num_layers * 2 * token_dim), as PEFT saves them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from peftctl.adapters.config import READING_SAVED
from peftctl.adapters.prompt_config import PromptLearningConfig


class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's `PrefixTuningConfig`."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    prefix: ClassVar[str] = "prompt_embeddings"

    method: Literal["prefix_tuning"] = Field(default="prefix_tuning", description="Adapter method.")
    encoder_hidden_size: int | None = Field(
        default=None, ge=1,
        description="The projection's hidden size (prefix_projection only); unset: token_dim.")
    prefix_projection: bool = Field(
        default=False, description="Make the keys and values from embeddings by Linear-Tanh-Linear (saved: its output).")
    init_weights: Literal["zero"] | None = Field(
        default=None,
        description="Unset: random init (N(0, 1), torch.nn.Embedding's); zero: keys and values start at 0.")

    @model_validator(mode="after")
    def _projection_only(self):
        # PEFT ignores encoder_hidden_size without prefix_projection (and records the model's width
        # there): refused in a new config, accepted from a file.
        if self.encoder_hidden_size is not None and not self.prefix_projection and not READING_SAVED.get():
            raise ValueError("encoder_hidden_size is only used with prefix_projection: true (the projection's "
                             "width; PEFT would ignore it): set prefix_projection: true or leave it unset")
        return self


CONFIG_CLASS = PrefixTuningConfig
