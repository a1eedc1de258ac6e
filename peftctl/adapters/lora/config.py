"""LoRA's config: PEFT's field names and meanings, so the recipe maps 1:1 onto adapter_config.json."""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from peftctl.adapters.config import READING_SAVED, LayerSelectionConfig, positive_ranks, regex_keys

# init_lora_weights values peftctl implements. "pissa_niter_<n>" (fast randomized SVD) also works.
INITS = (True, False, "gaussian", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_\d+")
# Inits PEFT offers that only decide the starting point of training and leave the base weights
# alone: an adapter made with one of them loads here as it is (its trained weights are in the file).
_WEIGHTS_ONLY_INITS = ("eva", "orthogonal", "mica")
# add_weighted_adapter's combination types (PEFT's), implemented in `combine.py`.
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTOR_TYPES, "cat", *SVD_TYPES)


def rank_factor(r: float, use_rslora: bool) -> float:
    """What LoRA's scaling divides lora_alpha by: r (LoRA: Hu et al. 2021, arXiv 2106.09685, section
    4.1), or sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv 2312.03732: with alpha / r the update's
    learning slows as the rank grows; alpha / sqrt(r) keeps it rank-stable). Multiplicative:
    rank_factor(k * r) = rank_factor(k) * rank_factor(r)."""
    return math.sqrt(r) if use_rslora else r


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """s in y = W x + s * B A x: lora_alpha / rank_factor(r, use_rslora), the one formula every
    layer, config, resize and report uses. Its inverse: lora_alpha = s * rank_factor(r, use_rslora)."""
    return lora_alpha / rank_factor(r, use_rslora)


class LoraConfig(LayerSelectionConfig):
    """Low-rank adaptation: y = W x + (B A dropout(x)) * scaling, scaling = lora_alpha / r.

    With `use_rslora`, scaling = lora_alpha / sqrt(r). With `use_dora`, the adapted weight is
    re-normalised per output row and multiplied by a trained magnitude vector (DoRA).
    """

    peft_type: ClassVar[str] = "LORA"
    prefix: ClassVar[str] = "lora_"
    mixed_batches: ClassVar[bool] = True
    combination_types: ClassVar[tuple[str, ...]] = COMBINATION_TYPES
    default_combination: ClassVar[str | None] = "cat"  # `peftctl merge`'s: exact (PEFT's API default is svd)
    unsupported_peft_keys: ClassVar[dict[str, tuple]] = {
        "layer_replication": (None,),
        "trainable_token_indices": (None,),
        "target_parameters": (None, []),
        "use_qalora": (False, None),
        "use_bdlora": (False, None),
        "alora_invocation_tokens": (None,),
        "arrow_config": (None,),
        "kasa_config": (None,),
        "monteclora_config": (None,),
        "velora_config": (None,),
        "megatron_config": (None,),
        "ensure_weight_tying": (False, None),
    }
    # PEFT's settings of features refused here (loftq/eva/corda/lora_ga inits, QALoRA, Megatron).
    inert_peft_keys: ClassVar[tuple[str, ...]] = (
        *LayerSelectionConfig.inert_peft_keys, "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "qalora_group_size", "megatron_core",
    )

    method: Literal["lora"] = Field(default="lora", description="Adapter method.")
    r: int = Field(default=8, ge=1, description="Rank of the update matrices A (r x in) and B (out x r).")
    lora_alpha: float = Field(
        default=8, gt=0, description="Scaling numerator: the update is multiplied by lora_alpha / r."
    )
    lora_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Dropout on the adapter's input (0 means none at all; embeddings never use it).",
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA: scaling = lora_alpha / sqrt(r)."
    )
    use_dora: bool = Field(
        default=False,
        description=(
            "DoRA: W' = m * (W + scaling B A) / ||W + scaling B A|| (row norm, computed without "
            "gradient), with a trained magnitude vector m that starts at the row norms."
        ),
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none",
        description=(
            "Which biases of the base model train (and are saved): none, all, or lora_only (the "
            "biases of the adapted layers). With biases trained, disabling the adapter no longer "
            "gives the base model's outputs."
        ),
    )
    lora_bias: bool = Field(
        default=False,
        description="Give B a bias of its own (trained, saved, merged into the base bias); not with DoRA.",
    )
    fan_in_fan_out: bool = Field(
        default=False,
        description=(
            "The base weight is stored (in, out), as in GPT-2's Conv1D. Set automatically for "
            "Conv1D layers; recorded in adapter_config.json."
        ),
    )
    init_lora_weights: bool | str = Field(
        default=True,
        description=(
            "true: A Kaiming-uniform, B zero (the model's outputs are unchanged at step 0); "
            "gaussian: A normal with std 1/r, B zero; pissa (or pissa_niter_<n> for a fast "
            "randomized SVD): A and B from the base weight's top singular vectors, which are "
            "subtracted from the base weight; olora: A and B from a QR decomposition of the base "
            "weight, likewise subtracted; false: A and B random (for tests)."
        ),
    )
    rank_pattern: dict[str, int] = Field(
        default={},
        description=(
            "Per-module ranks overriding r: {pattern: rank}. A pattern is a regex matched against "
            "the module's dotted path or its end after a dot, e.g. {v_proj: 16, "
            "'layers.0.self_attn.q_proj': 4}. When several match, the most specific wins, whatever "
            "their order: the one matching more parts of the path (a full path beats all), then a "
            "plain name over a regex; still tied with different values is an error. A key that "
            "matches no adapted module is an error."
        ),
    )
    alpha_pattern: dict[str, float] = Field(
        default={},
        description="Per-module lora_alpha overriding lora_alpha, matched like rank_pattern.",
    )

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _known_init(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in INITS or (isinstance(v, str) and _PISSA_NITER.fullmatch(v)):
            return v
        raise ValueError(
            f"init_lora_weights must be true, false, gaussian, pissa, pissa_niter_<n> or olora (got {v!r})"
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
        """A plain pattern key (a dotted name) that no module selected by a list of target names can
        match is a misspelling: an error naming it, before any model is loaded. Regex keys, and
        targets given as a regex, all-linear or the model's default, are checked against the model
        when the adapter is created. Skipped for a saved adapter's config (PEFT only warns there)."""
        if READING_SAVED.get() or not isinstance(self.target_modules, list) or not self.target_modules:
            return self
        for field in ("rank_pattern", "alpha_pattern"):
            bad = [k for k in getattr(self, field) if _plain(k) and not any(_can_match(k, t) for t in self.target_modules)]
            if bad:
                import difflib

                close = difflib.get_close_matches(bad[0].split(".")[-1], [t.split(".")[-1] for t in self.target_modules], n=2)
                raise ValueError(
                    f"{field} key {bad[0]!r} matches no module that target_modules selects "
                    f"({', '.join(self.target_modules)})" + (f"; did you mean {' or '.join(close)}?" if close else ""))
        return self

    @model_validator(mode="after")
    def _lora_bias_limits(self):
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias cannot be combined with use_dora")
        if self.lora_bias and not isinstance(self.init_lora_weights, bool):
            raise ValueError("lora_bias needs init_lora_weights true or false")
        return self

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        d = dict(d)
        init = d.get("init_lora_weights", True)
        if init in _WEIGHTS_ONLY_INITS:
            d["init_lora_weights"] = True  # the file holds the trained weights; the init is history
        elif isinstance(init, str) and init not in INITS and not _PISSA_NITER.fullmatch(init):
            raise ValueError(
                f"this adapter was initialised with init_lora_weights={init!r}, which changes the base "
                "model's weights in a way peftctl does not reproduce; convert it to plain LoRA in PEFT "
                "first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
            )
        return super().from_peft_dict(d)

    def describe_module(self, module: str, tensors: dict[str, list[int]]) -> dict[str, Any]:
        """Rank (from A's saved shape), lora_alpha (alpha_pattern applied) and scaling of one module."""
        a = tensors.get("lora_A.weight") or tensors.get("lora_embedding_A")
        if a is None:
            return {}
        from peftctl.adapters.matching import saved_pattern_value

        rank = a[0]
        alpha = saved_pattern_value(self.alpha_pattern, module, self.lora_alpha, "alpha_pattern")
        return {"rank": rank, "lora_alpha": alpha, "scaling": lora_scaling(alpha, rank, self.use_rslora)}

    @property
    def scaling(self) -> float:
        """The default scaling (`lora_scaling` of lora_alpha and r; patterns may differ per module)."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    @property
    def changes_base_weights(self) -> bool:
        """PiSSA and OLoRA move part of the base weight into the adapter when it is created."""
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian"


def _plain(key: str) -> bool:
    """A dotted name: no regex syntax but the dots (each of which matches any one character)."""
    return re.escape(key).replace(r"\.", ".") == key


def _same(key: str, text: str) -> bool:
    """Whether plain `key` (as the regex it is: a dot matches any character) matches `text` whole."""
    return len(key) == len(text) and all(k == "." or k == c for k, c in zip(key, text, strict=True))


def _can_match(key: str, target: str) -> bool:
    """Whether plain `key` can match the path of a module that target name `target` selects: such a
    path equals `target` or ends with "." + `target`, and a key matches the path or its end after a
    dot."""
    if len(key) <= len(target):  # the key matches the target itself or a dotted end of it
        start = len(target) - len(key)
        return (start == 0 or target[start - 1] == ".") and _same(key, target[start:])
    # A longer key matches a path that ends with "." + target.
    return _same(key[len(key) - len(target) - 1:], "." + target)


CONFIG_CLASS = LoraConfig
