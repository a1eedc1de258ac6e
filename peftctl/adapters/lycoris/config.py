"""The config fields LoHa and LoKr share (PEFT's `LycorisConfig` and the fields both of its
subclasses define), with PEFT's names, defaults and meanings.

Both methods build a full-size weight update ΔW from small factors, scaled by alpha / r (rank and
alpha per module from `rank_pattern` / `alpha_pattern`), and add W x + ΔW x; merging adds ΔW to W.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from peftctl.adapters.config import READING_SAVED, LayerSelectionConfig, positive_ranks, regex_keys


class LycorisConfig(LayerSelectionConfig):
    """Fields of PEFT's LoHaConfig and LoKrConfig alike. Subclasses set `method`, `peft_type`,
    `prefix` and any fields of their own."""

    # rank_pattern / alpha_pattern and the fields whose value they override (`matching`'s pattern rules).
    pattern_fields: ClassVar[dict[str, str]] = {"rank_pattern": "r", "alpha_pattern": "alpha"}

    r: int = Field(default=8, ge=1, description="Rank of the factors (see the method).")
    alpha: float = Field(
        default=8, gt=0, description="Scaling numerator: the update is multiplied by alpha / r."
    )
    rank_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description=(
            "Training only: the probability of zeroing each output row of the update (a fresh draw "
            "per forward; see the method for the rescaling)."
        ),
    )
    module_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Training only: the probability of leaving the whole update out of one forward of a layer.",
    )
    use_effective_conv2d: bool = Field(
        default=False,
        description=(
            "For convolutions with a kernel larger than 1: factor the kernel with a small core "
            "tensor (r x r x kernel, FedPara's Proposition 3, as PEFT) instead of flattening the "
            "kernel into the input dimension."
        ),
    )
    init_weights: bool = Field(
        default=True,
        description=(
            "true: one factor starts at zero (the model's outputs are unchanged at step 0), the "
            "others Kaiming-uniform; false: all factors random (for tests)."
        ),
    )
    rank_pattern: dict[str, int] = Field(
        default={},
        description=(
            "Per-module ranks overriding r: {pattern: rank}, matched as LoRA's rank_pattern (a regex "
            "matched against the module's dotted path or its end after a dot; the most specific key "
            "wins; a key matching no adapted module is an error)."
        ),
    )
    alpha_pattern: dict[str, float] = Field(
        default={}, description="Per-module alpha overriding alpha, matched like rank_pattern."
    )

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, v: dict[str, int]) -> dict[str, int]:
        return positive_ranks(v)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _keys_are_regexes(cls, v: dict[str, Any], info) -> dict[str, Any]:
        return regex_keys(v, info.field_name)

    @model_validator(mode="after")
    def _pattern_keys_fit_the_targets(self):
        """A plain pattern key that no module selected by a list of target names can match: an error
        naming it (LoRA's check, `lora.config`); skipped for a saved adapter's config."""
        from peftctl.adapters.lora.config import _can_match, _plain

        if READING_SAVED.get() or not isinstance(self.target_modules, list) or not self.target_modules:
            return self
        for field in self.pattern_fields:
            bad = [k for k in getattr(self, field) if _plain(k) and not any(_can_match(k, t) for t in self.target_modules)]
            if bad:
                raise ValueError(f"{field} key {bad[0]!r} matches no module that target_modules selects "
                                 f"({', '.join(self.target_modules)})")
        return self

    def describe_module(self, module: str, tensors: dict[str, list[int]]) -> dict[str, Any]:
        """Rank, alpha and scaling of one saved module (rank_pattern / alpha_pattern applied)."""
        if not tensors:
            return {}
        from peftctl.adapters.matching import saved_pattern_value

        rank = saved_pattern_value(self.rank_pattern, module, self.r, "rank_pattern")
        alpha = saved_pattern_value(self.alpha_pattern, module, self.alpha, "alpha_pattern")
        return {"rank": rank, "alpha": alpha, "scaling": alpha / rank}
