"""AdaLoRA's config: PEFT's field names, defaults and checks, so the recipe maps 1:1 onto adapter_config.json.

AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR,
https://openreview.net/forum?id=lq62uWRJjiY) writes each update in SVD form, ΔW = P Λ Q (eq. 3),
with P = lora_B (out x r), Λ = diag(lora_E) (r x 1) and Q = lora_A (r x in), regularises P and Q
towards orthogonality (eq. 4) and, during training, prunes the singular values of the least important
triplets (eqs. 5-8) following a cubic budget schedule (eq. 12), so that the total rank falls from
`init_r` per module to `target_r` per module on average. The surviving triplets are recorded in
`rank_pattern` (one boolean list per module) when training ends.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from peftctl.adapters.config import READING_SAVED, LayerSelectionConfig
from peftctl.adapters.lora.config import LoraConfig

# PEFT 0.21's table (peft.utils.constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING),
# entry for entry; a test compares it with PEFT's.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class AdaLoraConfig(LayerSelectionConfig):
    """AdaLoRA: y = W x + (dropout(x) Qᵀ Λ Pᵀ) * lora_alpha / ranknum per adapted layer, with
    Q = lora_A (r x in), Λ = lora_E (r x 1), P = lora_B (out x r), r = init_r and ranknum = init_r
    (PEFT's scaling: lora_alpha / (ranknum + 1e-5)). Training adds orth_reg_weight times the mean of
    ||PᵀP - I||_F and ||Q Qᵀ - I||_F over the adapted matrices to the loss, and after each optimizer
    step updates the sensitivity averages and masks the least important triplets to the step's budget.
    """

    peft_type: ClassVar[str] = "ADALORA"
    prefix: ClassVar[str] = "lora_"
    default_target_modules: ClassVar[dict[str, list[str] | str] | None] = DEFAULT_TARGETS
    # rank_pattern here is AdaLoRA's mask per module, not LoRA's {pattern: rank} (matching's pattern rules).
    pattern_fields: ClassVar[dict[str, str]] = {}
    # PEFT's AdaLoraConfig refuses DoRA and LoftQ; the LoRA options it has no use for are PEFT's too.
    unsupported_peft_keys: ClassVar[dict[str, tuple]] = {
        **LoraConfig.unsupported_peft_keys, "use_dora": (False, None), "loftq_config": ({}, None),
    }
    # LoraConfig fields PEFT's AdaLoRA ignores whatever their value (r: init_r is the rank; no rsLoRA
    # scaling, no lora_bias, no alpha_pattern in its layers), as peftctl does.
    inert_peft_keys: ClassVar[tuple[str, ...]] = (
        *LoraConfig.inert_peft_keys, "r", "use_rslora", "lora_bias", "alpha_pattern",
    )
    warned_peft_keys: ClassVar[dict[str, str]] = {
        "r": "r is not used by AdaLoRA and is ignored; the initial rank is init_r (PEFT warns alike)",
        "use_rslora": "use_rslora is not used by AdaLoRA and is ignored (its scaling is lora_alpha / init_r)",
        "lora_bias": "lora_bias is not used by AdaLoRA and is ignored",
        "alpha_pattern": "alpha_pattern is not used by AdaLoRA and is ignored",
    }

    method: Literal["adalora"] = Field(default="adalora", description="Adapter method.")
    init_r: int = Field(default=12, ge=1, description="Initial rank of every adapted matrix (triplets per module).")
    target_r: int = Field(
        default=8, ge=0,
        description="Target average rank: the final budget is target_r times the number of adapted modules.",
    )
    tinit: int = Field(default=0, ge=0, description="Optimizer steps of initial warm-up before any triplet is pruned.")
    tfinal: int = Field(
        default=0, ge=0,
        description="Optimizer steps at the end trained with the final masks fixed (no more reallocation).",
    )
    deltaT: int = Field(default=1, ge=1, description="Optimizer steps between two budget allocations (masks).")
    beta1: float = Field(
        default=0.85, gt=0, lt=1,
        description="Weight of the old value in the moving average of the sensitivity |w * dL/dw|.",
    )
    beta2: float = Field(
        default=0.85, gt=0, lt=1,
        description="Weight of the old value in the moving average of the uncertainty |sensitivity - its average|.",
    )
    orth_reg_weight: float = Field(
        default=0.5, ge=0,
        description="Weight of the orthogonal regularisation added to the loss (0: none).",
    )
    total_step: int | None = Field(
        default=None, ge=1,
        description=(
            "Total optimizer steps the budget schedule spans: budget init_r per module until tinit, "
            "falling cubically to target_r per module at total_step - tfinal, then fixed. In a recipe, "
            "unset means the run's total optimizer steps (and is recorded so in adapter_config.json); "
            "in Python it must be set before training (PEFT requires it)."
        ),
    )
    rank_pattern: dict[str, list[bool]] | None = Field(
        default=None,
        description=(
            "Written by training, not an input: the surviving triplets of each module "
            "({'<module path>.lora_E': [true, false, ...]}); a saved adapter holds only those."
        ),
    )
    lora_alpha: float = Field(
        default=8, ge=0,
        description="Scaling numerator: the update is multiplied by lora_alpha / init_r (0: by 1, PEFT's rule).",
    )
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    fan_in_fan_out: bool = Field(
        default=False,
        description="The base weight is stored (in, out), as in GPT-2's Conv1D. Set automatically for Conv1D layers.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which biases of the base model train (and are saved): none, all, or lora_only.",
    )
    init_lora_weights: bool = Field(
        default=True,
        description="true: Λ zero, P and Q normal with std 0.02 (outputs unchanged at step 0); false: all "
                    "standard normal (for tests).",
    )

    @field_validator("rank_pattern")
    @classmethod
    def _pattern_is_an_output(cls, v: Any) -> Any:
        if v is not None and not READING_SAVED.get():
            raise ValueError("rank_pattern is written by AdaLoRA's training (the surviving triplets); it is not "
                             "an input")
        return v

    @model_validator(mode="after")
    def _schedule_has_a_budget_phase(self):
        check_schedule(self.tinit, self.tfinal, self.total_step)
        return self

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> AdaLoraConfig:
        d = dict(d)
        init = d.get("init_lora_weights", True)
        if isinstance(init, str):  # PEFT's AdaLoRA tests the value's truth (any init name resets the weights)
            d["init_lora_weights"] = bool(init)
        return super().from_peft_dict(d)

    def to_peft_dict(self) -> dict[str, Any]:
        if self.total_step is None:
            raise ValueError("an AdaLoRA adapter without total_step cannot be saved (PEFT requires it): set "
                             "total_step, or train it (a run sets it to its number of optimizer steps)")
        return super().to_peft_dict()

    def describe_module(self, module: str, tensors: dict[str, list[int]]) -> dict[str, Any]:
        """Rank (surviving triplets, from lora_E's saved shape), init_r and the scaling lora_alpha / init_r."""
        e = tensors.get("lora_E")
        if e is None:
            return {}
        scale = self.lora_alpha if self.lora_alpha > 0 else e[0]
        return {"rank": e[0], "init_r": self.init_r, "scaling": scale / (self.init_r + 1e-5)}


def check_schedule(tinit: int, tfinal: int, total_step: int | None) -> None:
    """PEFT's check: the schedule must leave a budgeting phase (ValueError otherwise)."""
    if total_step is not None and tinit >= total_step - tfinal:
        raise ValueError(f"tinit ({tinit}) must be below total_step - tfinal ({total_step} - {tfinal}): the schedule "
                         "leaves no step to prune in; decrease tinit or tfinal, or increase total_step")


CONFIG_CLASS = AdaLoraConfig
