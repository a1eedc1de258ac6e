"""LoRA's config: PEFT's field names and meanings, so the recipe maps 1:1 onto adapter_config.json."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from peftctl.adapters.config import AdapterConfig


class LoraConfig(AdapterConfig):
    """Low-rank adaptation: y = W x + (B A dropout(x)) * scaling, scaling = lora_alpha / r.

    With `use_rslora`, scaling = lora_alpha / sqrt(r).
    """

    peft_type: ClassVar[str] = "LORA"
    unsupported_peft_keys: ClassVar[dict[str, tuple]] = {
        "use_dora": (False, None),
        "bias": ("none",),
        "lora_bias": (False, None),
        "fan_in_fan_out": (False, None),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "layers_to_transform": (None,),
        "modules_to_save": (None,),
        "layer_replication": (None,),
        "trainable_token_indices": (None,),
        "target_parameters": (None, []),
        "use_qalora": (False, None),
        "use_bdlora": (False, None),
        "alora_invocation_tokens": (None,),
        "arrow_config": (None,),
        "kasa_config": (None,),
        "monteclora_config": (None,),
        "megatron_config": (None,),
        "ensure_weight_tying": (False, None),
    }

    method: Literal["lora"] = Field(default="lora", description="Adapter method.")
    r: int = Field(default=8, ge=1, description="Rank of the update matrices A (r x in) and B (out x r).")
    lora_alpha: float = Field(
        default=8, gt=0, description="Scaling numerator: the update is multiplied by lora_alpha / r."
    )
    lora_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (0 means none at all)."
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA: scaling = lora_alpha / sqrt(r)."
    )
    init_lora_weights: bool = Field(
        default=True,
        description=(
            "true: A Kaiming-uniform, B zero, so training starts from the base model's outputs; "
            "false: both random (for tests)."
        ),
    )

    def to_peft_dict(self):
        d = super().to_peft_dict()
        # The keys PEFT itself writes for plain LoRA, so that PEFT and other readers (vLLM, TGI)
        # find every field they look up.
        d.update(
            bias="none",
            fan_in_fan_out=False,
            lora_bias=False,
            use_dora=False,
            rank_pattern={},
            alpha_pattern={},
            layers_to_transform=None,
            layers_pattern=None,
            modules_to_save=None,
        )
        return d

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


CONFIG_CLASS = LoraConfig
