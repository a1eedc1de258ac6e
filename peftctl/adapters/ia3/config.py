"""(IA)³'s config: PEFT's field names and meanings, so the recipe maps 1:1 onto adapter_config.json.

(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", §3.3) learns one vector per adapted layer that rescales activations
element-wise: a feed-forward layer's input (y = W (l ⊙ x) + b), any other layer's output
(y = l ⊙ (W x + b)). Nothing else is trained.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from peftctl.adapters.config import READING_SAVED, AdapterConfig

# PEFT 0.21's tables (peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# ..._FEEDFORWARD_MODULES_MAPPING), entry for entry; a test compares them with PEFT's.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


class IA3Config(AdapterConfig):
    """(IA)³: one trained vector l per adapted layer, initialised to ones, that rescales the layer's
    output (y = l ⊙ (W x + b)) or, for the `feedforward_modules`, its input (y = W (l ⊙ x) + b).
    Merging multiplies W's rows (output) or columns (input) by l, and the bias by l for output scaling.
    """

    peft_type: ClassVar[str] = "IA3"
    prefix: ClassVar[str] = "ia3_"
    default_target_modules: ClassVar[dict[str, list[str] | str] | None] = DEFAULT_TARGETS
    # PEFT's IA3Model.add_weighted_adapter: the weighted sum of the vectors.
    combination_types: ClassVar[tuple[str, ...]] = ("linear",)
    default_combination: ClassVar[str | None] = "linear"

    method: Literal["ia3"] = Field(default="ia3", description="Adapter method.")
    target_modules: list[str] | str | None = Field(
        default=None,
        description=(
            "Modules to adapt: a list of names (a name matches a module whose dotted path equals it or "
            "ends with '.' + it), a regular expression string (full match against the dotted path), or "
            "'all-linear' (every linear layer except the output head). Empty: PEFT's (IA)³ default for "
            "the model type (k_proj, v_proj and down_proj for Llama)."
        ),
    )
    feedforward_modules: list[str] | str | None = Field(
        default=None,
        description=(
            "The adapted modules whose input is scaled (the others' output is): a list of names, each "
            "matching a module whose dotted path ends with it (a plain suffix, PEFT's rule), which must "
            "be among target_modules when both are lists; or a regular expression (full match). Unset: "
            "PEFT's default for the model type (down_proj for Llama); [] scales every output."
        ),
    )
    fan_in_fan_out: bool = Field(
        default=False,
        description=(
            "The base weight is stored (in, out), as in GPT-2's Conv1D. Set automatically for Conv1D "
            "layers; recorded in adapter_config.json."
        ),
    )
    init_ia3_weights: bool = Field(
        default=True,
        description="true: the vectors start at ones (the model's outputs are unchanged at step 0); "
                    "false: random normal (for tests).",
    )

    @field_validator("feedforward_modules", mode="before")
    @classmethod
    def _ff_as_sorted_list(cls, v: Any) -> Any:
        if isinstance(v, set | frozenset | tuple | list):
            return sorted(set(v))
        return v

    @field_validator("feedforward_modules")
    @classmethod
    def _ff_regex_compiles(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"feedforward_modules {v!r} is not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _feedforward_among_targets(self):
        # PEFT's check of a new config, made when both are lists of names. Not of a saved one: PEFT
        # writes files that fail it (its default feedforward_modules, or all-linear written out as
        # paths, next to names), and cannot load them back; peftctl loads them (see `recorded`).
        if READING_SAVED.get():
            return self
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list) \
                and self.target_modules:
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; not among them: "
                                 f"{', '.join(extra)}")
        return self

    def with_model_defaults(self, model_type: str | None) -> IA3Config:
        """`feedforward_modules` unset: PEFT's default for the model type (ValueError when there is none)."""
        if self.feedforward_modules is not None:
            return self
        if model_type not in DEFAULT_FEEDFORWARD:
            raise ValueError(f"feedforward_modules is unset and there is no default for model type {model_type!r}; "
                             "set feedforward_modules (the names of the modules whose input is scaled, or [])")
        return self.model_copy(update={"feedforward_modules": list(DEFAULT_FEEDFORWARD[model_type])})

    def recorded(self, adapted: list[str]) -> IA3Config:
        """feedforward_modules as PEFT can read it back. PEFT refuses a file whose feedforward_modules
        and target_modules are lists and the first is not a subset of the second, and writes such files
        itself (the model type's default feedforward_modules beside the user's targets; all-linear
        written out as module paths). Such a config is recorded with the adapted feed-forward modules'
        exact paths as a regex instead (or [] when none is), which selects the same modules."""
        ff, targets = self.feedforward_modules, self.target_modules
        if not (isinstance(ff, list) and isinstance(targets, list)) or set(ff) <= set(targets):
            return self
        scaled = [m for m in adapted if self.is_feedforward(m)]
        return self.model_copy(update={"feedforward_modules": "|".join(re.escape(m) for m in scaled) if scaled else []})

    def is_feedforward(self, module: str) -> bool:
        """Whether the adapter scales module `module`'s input (PEFT's rule: a regex matches the whole
        dotted path; a list entry is a plain suffix of it)."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(name) for name in ff or ())

    def describe_module(self, module: str, tensors: dict[str, list[int]]) -> dict[str, Any]:
        shape = tensors.get("ia3_l")
        if shape is None:
            return {}
        return {"scales": "input" if self.is_feedforward(module) else "output", "features": max(shape)}


CONFIG_CLASS = IA3Config
