"""LoHa's config: PEFT's LoHaConfig field for field (the shared ones in `lycoris.config`).

LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", eq. 2; LyCORIS's implementation, as PEFT) trains two rank-r factorisations whose
element-wise product is the update: ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r, of rank up to r².
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from peftctl.adapters.lycoris.config import LycorisConfig


class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product: ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r on nn.Linear (W1a, W2a:
    (out, r); W1b, W2b: (r, in)), nn.Conv2d and nn.Conv1d (the kernel flattened into the input
    dimension, or with `use_effective_conv2d` each factor rebuilt from a core tensor (r, r, *kernel)
    and mode matrices (r, out), (r, in)). `init_weights` true: W2b starts at zero. Rank dropout's
    mask is divided by its mean (as PEFT's LoHa)."""

    peft_type: ClassVar[str] = "LOHA"
    prefix: ClassVar[str] = "hada_"

    method: Literal["loha"] = Field(default="loha", description="Adapter method.")


CONFIG_CLASS = LoHaConfig
