"""Prompt tuning's config: PEFT's `PromptTuningConfig` field names, defaults and meanings.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", §2)
learns `num_virtual_tokens` input embeddings P (num_virtual_tokens, token_dim) that are prepended to
every sequence's token embeddings: the model reads [P; E(x)]. Nothing else is trained.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from peftctl.adapters.config import READING_SAVED
from peftctl.adapters.prompt_config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptTuningConfig(PromptLearningConfig):
    """PEFT's `PromptTuningConfig`."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prefix: ClassVar[str] = "prompt_embeddings"

    method: Literal["prompt_tuning"] = Field(default="prompt_tuning", description="Adapter method.")
    prompt_tuning_init: Literal["TEXT", "SAMPLE_VOCAB", "RANDOM"] = Field(
        default="RANDOM",
        description=(
            "How the virtual tokens start: RANDOM (a standard normal draw, as torch.nn.Embedding), "
            "SAMPLE_VOCAB (the embeddings of tokens drawn uniformly from the vocabulary), TEXT (the "
            "embeddings of prompt_tuning_init_text's tokens, repeated or cut to num_virtual_tokens)."
        ),
    )
    prompt_tuning_init_text: str | None = Field(
        default=None,
        description=(
            "The text whose token embeddings start the virtual tokens (prompt_tuning_init TEXT). In a "
            "recipe it is tokenized with the run's tokenizer; in the Python API with tokenizer_name_or_path."
        ),
    )
    tokenizer_name_or_path: str | None = Field(
        default=None,
        description="The tokenizer for prompt_tuning_init_text in the Python API (a recipe uses its own tokenizer).",
    )
    tokenizer_kwargs: dict | None = Field(
        default=None,
        description="Keyword arguments for that tokenizer's from_pretrained (prompt_tuning_init TEXT only; "
                    "trust_remote_code is dropped, as PEFT drops it).",
    )

    @model_validator(mode="after")
    def _text_init(self):
        """The text fields are read with TEXT only: set with RANDOM or SAMPLE_VOCAB they are refused
        in a new config (PEFT refuses tokenizer_kwargs so but accepts and ignores
        prompt_tuning_init_text and tokenizer_name_or_path); a saved file's are accepted, as PEFT does."""
        if self.prompt_tuning_init == PromptTuningInit.TEXT and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init TEXT")
        if self.prompt_tuning_init != PromptTuningInit.TEXT and not READING_SAVED.get():
            for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only read with prompt_tuning_init TEXT (this is "
                                     f"{self.prompt_tuning_init}; PEFT would ignore it): set prompt_tuning_init: "
                                     f"TEXT or leave {name} unset")
        return self

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        if d["prompt_tuning_init"] == "TEXT" and not d.get("tokenizer_name_or_path"):
            # PEFT refuses a TEXT config without a tokenizer (even to load it); a recipe's run read its
            # text with the base model's tokenizer, which is what this names.
            d["tokenizer_name_or_path"] = d.get("base_model_name_or_path")
        return d


CONFIG_CLASS = PromptTuningConfig
