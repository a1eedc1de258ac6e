"""LoKr's config: PEFT's LoKrConfig field for field (the shared ones in `lycoris.config`).

LoKr (Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter"; Yeh et al.
2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", §3.2;
LyCORIS's implementation, as PEFT) makes the update a Kronecker product ΔW = W1 ⊗ W2 · alpha / r of a
small matrix W1 and a larger one W2, either factor optionally low-rank.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from peftctl.adapters.lycoris.config import LycorisConfig


class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product: ΔW = W1 ⊗ W2 · alpha / r on nn.Linear, nn.Conv2d and nn.Conv1d.
    The output and input sizes are each split into two factors (out = a·b, in = c·d; `decompose_factor`):
    W1 is (a, c), W2 (b, d[, kernel]). W2 is low-rank (W2a (b, r) W2b (r, d)) unless r >= max(b, d) / 2;
    W1 is full unless `decompose_both` and r < max(a, c) / 2. `init_weights` true: W1 (or W1a)
    starts at zero; "lycoris": W2 (or W2b) does, as in the LyCORIS repository."""

    peft_type: ClassVar[str] = "LOKR"
    prefix: ClassVar[str] = "lokr_"

    method: Literal["lokr"] = Field(default="lokr", description="Adapter method.")
    init_weights: bool | Literal["lycoris"] = Field(
        default=True,
        description=(
            "true: W1 (or its first low-rank factor) starts at zero, the others Kaiming-uniform (the "
            "model's outputs are unchanged at step 0); lycoris: W2 (or its second factor) starts at "
            "zero instead; false: all factors random (for tests)."
        ),
    )
    decompose_both: bool = Field(
        default=False,
        description="Also make W1 low-rank (W1a (a, r) W1b (r, c)) when r < max(a, c) / 2.",
    )
    decompose_factor: int = Field(
        default=-1,
        description=(
            "How each of the layer's sizes n (out, in) is split into two factors, the first of W1's "
            "shape and the second of W2's (PEFT's `factorization`): a positive factor f that divides n "
            "gives (f, n / f); otherwise the most balanced split m <= n / m whose m is at most f "
            "(-1: no limit)."
        ),
    )
    rank_dropout_scale: bool = Field(
        default=False, description="Divide rank dropout's mask by its mean (rescale the kept rows)."
    )


CONFIG_CLASS = LoKrConfig
