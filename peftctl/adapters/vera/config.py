"""VeRA's config: PEFT's field names and meanings, so the recipe maps 1:1 onto adapter_config.json.

VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", eq. 1): one pair of
frozen random matrices A (r x in) and B (out x r), shared by every adapted layer, and per layer two
trained vectors: y = W x + Λ_b B Λ_d A x, with Λ_d = diag(d) (r entries) and Λ_b = diag(b) (out
entries). A and B are drawn once from `projection_prng_key`, sized for the largest adapted layer;
each layer uses their top-left corner (PEFT's layout).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field

from peftctl.adapters.config import LORA_DEFAULT_TARGETS, LayerSelectionConfig

# PEFT 0.21's peft.utils.constants.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, entry for entry
# (LoRA's table, `adapters.config.LORA_DEFAULT_TARGETS`, but phi without fc1 / fc2); a test compares it with PEFT's.
DEFAULT_TARGETS: dict[str, list[str] | str] = {**LORA_DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"]}


class VeraConfig(LayerSelectionConfig):
    """VeRA: y = W x + b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x)))), with A (r x in_max) and B (out_max x r)
    frozen, random (Kaiming uniform from `projection_prng_key`) and shared by every adapted layer, d
    (r) and b (out) trained per layer (Kopiczko et al. 2024, eq. 1). Linear layers and GPT-2's Conv1D
    only, as PEFT. Merging adds the update (b B[:out]) (d A[:, :in]) to the weight."""

    peft_type: ClassVar[str] = "VERA"
    prefix: ClassVar[str] = "vera_lambda_"
    default_target_modules: ClassVar[dict[str, list[str] | str] | None] = DEFAULT_TARGETS

    method: Literal["vera"] = Field(default="vera", description="Adapter method.")
    r: int = Field(
        default=256, ge=1,
        description=(
            "Rank of the shared random projections A (r x in) and B (out x r). Each layer trains r + out "
            "numbers whatever r is, so choose it higher than a LoRA rank (PEFT's default 256)."
        ),
    )
    target_modules: list[str] | str | None = Field(
        default=None,
        description=(
            "Modules to adapt (linear layers or GPT-2's Conv1D): a list of names (a name matches a module "
            "whose dotted path equals it, whatever layers_to_transform says, or ends with '.' + it), a "
            "regular expression string (full match against the dotted path), or 'all-linear' (every "
            "linear layer except the output head). Empty: PEFT's VeRA default for the model type "
            "(q_proj and v_proj for Llama-style models)."
        ),
    )
    exclude_modules: list[str] | str | None = Field(
        default=None,
        description=(
            "Modules never adapted, matched like target_modules (list or regex). PEFT's VeraConfig has no "
            "such field: adapter_config.json then records target_modules as the adapted modules' exact "
            "paths (a regex), which PEFT selects the same way."
        ),
    )
    projection_prng_key: int = Field(
        default=0,
        description=(
            "Seed of the shared random projections A and B (a torch.Generator on the CPU, Kaiming uniform, "
            "A drawn first). Every VeRA adapter on one model must use the same key."
        ),
    )
    save_projection: bool = Field(
        default=True,
        description=(
            "true: A and B are saved in the adapter file (base_model.vera_A, base_model.vera_B), so it "
            "loads the same anywhere; false: only the vectors are saved and A and B are drawn again from "
            "projection_prng_key on load (a smaller file, exact only where torch draws the same numbers)."
        ),
    )
    vera_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (0 means none at all)."
    )
    d_initial: float = Field(
        default=0.1,
        description="Starting value of every entry of the trained vector d (b starts at 0, so the model's "
                    "outputs are unchanged at step 0); small values (<= 0.1) are recommended.",
    )
    fan_in_fan_out: bool = Field(
        default=False,
        description=(
            "The base weight is stored (in, out), as in GPT-2's Conv1D. Set automatically for Conv1D "
            "layers; recorded in adapter_config.json."
        ),
    )
    bias: Literal["none", "all", "vera_only"] = Field(
        default="none",
        description=(
            "Which biases of the base model train (and are saved): none, all, or vera_only (the biases "
            "of the adapted layers). With biases trained, disabling the adapter no longer gives the base "
            "model's outputs."
        ),
    )
    init_weights: bool = Field(
        default=True,
        description="true: d starts at d_initial and b at 0; false: d random normal and b ones (for tests).",
    )

    def recorded(self, adapted: list[str]) -> VeraConfig:
        """PEFT's VeraConfig has no exclude_modules: a config using it (or layer selection with it) is
        recorded with the adapted modules' exact paths as a regex instead, which selects the same
        modules in PEFT."""
        if not self.exclude_modules:
            return self
        return self.model_copy(update={
            "target_modules": "|".join(re.escape(m) for m in adapted), "exclude_modules": None,
            "layers_to_transform": None, "layers_pattern": None,
        })

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's keys only: exclude_modules (not a VeraConfig field in PEFT) is left out when unset."""
        d = super().to_peft_dict()
        if d.get("exclude_modules") is None:
            d.pop("exclude_modules", None)
        return d

    def describe_module(self, module: str, tensors: dict[str, list[int]]) -> dict[str, Any]:
        d, b = tensors.get("vera_lambda_d"), tensors.get("vera_lambda_b")
        if d is None or b is None:
            return {}
        return {"r": d[0], "out_features": b[0]}


CONFIG_CLASS = VeraConfig
