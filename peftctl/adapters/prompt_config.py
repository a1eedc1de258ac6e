"""What the prompt-learning methods' configs share (PEFT's `PromptLearningConfig`): no torch here.

Prompt tuning, P-tuning and prefix tuning adapt no module: they change what the model reads
(virtual token embeddings prepended to the input, or per-layer keys and values before it). Their
configs therefore have no target_modules; the model's dimensions (`token_dim`, `num_layers`,
`num_attention_heads`, `num_transformer_submodules`) are filled in from the model when the adapter
is created, as PEFT's `_prepare_prompt_learning_config` does, and written to adapter_config.json.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from peftctl.adapters.config import AdapterConfig


class PromptLearningConfig(AdapterConfig):
    """PEFT's fields of every prompt-learning config."""

    # Not PEFT keys of these methods: accepted only empty, never written.
    _NO_MODULES: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules")

    target_modules: None = Field(default=None, description="Not used: prompt methods adapt no module (must be empty).")
    exclude_modules: None = Field(default=None, description="Not used: prompt methods adapt no module (must be empty).")
    num_virtual_tokens: int = Field(ge=1, description="Number of virtual tokens (required, as in PEFT).")
    token_dim: int | None = Field(
        default=None, ge=1,
        description="The hidden embedding dimension of the base model; unset: taken from the model.")
    modules_to_save: None = Field(
        default=None, description="Not supported with prompt-learning methods here (must be empty).")
    num_transformer_submodules: int | None = Field(
        default=None, ge=1, le=2,
        description="1 for a decoder-only model, 2 for an encoder-decoder (T5-style, task_type SEQ_2_SEQ_LM); "
                    "unset: taken from the model.")
    num_attention_heads: int | None = Field(
        default=None, ge=1, description="Number of attention heads of the base model; unset: taken from the model.")
    num_layers: int | None = Field(
        default=None, ge=1, description="Number of layers of the base model; unset: taken from the model.")

    @field_validator("target_modules", "exclude_modules", mode="before")
    @classmethod
    def _no_modules(cls, v: Any) -> Any:
        if v not in (None, [], ""):
            raise ValueError("prompt-learning methods adapt no module; leave it unset")
        return None

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _no_modules_to_save(cls, v: Any) -> Any:
        # PEFT trains classification heads this way; peftctl's prompt methods serve causal and seq2seq LMs only.
        if v:
            raise ValueError("modules_to_save is not supported with prompt-learning methods here")
        return None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def to_peft_dict(self) -> dict[str, Any]:
        d = super().to_peft_dict()
        for key in self._NO_MODULES:
            d.pop(key, None)
        return d
