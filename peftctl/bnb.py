"""bitsandbytes' quantized linears as peftctl reads and runs them: the one place that depends on how
bitsandbytes stores their weights. Used by the adapter core (QLoRA layers) and by model loading;
bitsandbytes is imported only when a model holding its layers has imported it already.

**The CPU layout.** On a CPU with AVX512-BF16, bitsandbytes (0.50; measured with 0.50.2) repacks a
`Linear4bit`'s weight in place at its first forward in eval mode without gradients, into a layout
for its bfloat16 CPU kernel, and from then on computes that layer with that kernel in every mode:
in bfloat16 whatever the layer's compute dtype (outputs about 4e-3 off, relative Frobenius error
0.3%), and in training mode with no backward through it (the input's gradient is silently lost, so
every adapter below such a layer stops learning from it). bitsandbytes' public `dequantize_4bit`
reads a repacked weight wrong (up to 0.11 off). So one evaluation would change how a model trains.
peftctl keeps every `Linear4bit` of a model it loads or adapts in bitsandbytes' plain layout
(`keep_plain_layout`): the layer then dequantizes its weight and multiplies in its compute dtype on
every CPU, eval or train, the same numbers on every x86-64 CPU, and evaluating changes nothing. The
cost is bitsandbytes' bfloat16 inference kernel, which a 4-bit model evaluated on such a CPU does
not use (outputs in the dtype the model was asked to compute in are what peftctl reports).

A weight bitsandbytes has repacked already (the user's own code ran the model in eval mode before
handing it over) is refused, naming the layer: its block scales were rounded to bfloat16, and
bitsandbytes' inverse (used before it saves such a layer) does not give the weight back (0.50.2,
measured: 0.1% off with double quantization, 2% without, where it reads the scales transposed).

Public bitsandbytes API only: `dequantize_4bit`, `int8_vectorwise_dequant`, and the layer
attribute `support_avx512bf16_for_cpu` (no leading underscore; bitsandbytes sets it at
construction from its CPU check and reads it at each forward; versions without the repacking lack
it and have nothing to switch off). Whether a weight is repacked is read from its quantization
state's `packing_format_for_cpu` flag (absent: not repacked).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _repacked(layer) -> bool:
    """Whether bitsandbytes holds this Linear4bit's weight in its CPU-kernel layout."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def _refuse_repacked(name: str) -> ValueError:
    return ValueError(
        f"{name or 'a Linear4bit layer'}: bitsandbytes has repacked this 4-bit weight for its bfloat16 CPU "
        "kernel (an eval-mode forward ran before peftctl saw the model). That layout keeps the block scales "
        "only in bfloat16 and has no backward pass, and bitsandbytes' way back loses the weight, so its "
        "values can no longer be read exactly nor trained through. Load the model again and adapt it "
        "before running it, or call peftctl.bnb.keep_plain_layout(model) right after loading"
    )


def keep_plain_layout(model: torch.nn.Module, prefix: str = "") -> None:
    """Keep every bitsandbytes `Linear4bit` in `model` in the plain 4-bit layout on the CPU (see the
    module docstring): bitsandbytes will not repack it for its bfloat16 CPU kernel. No-op for a model
    without such layers.
    `prefix`: the model's own name, for messages.

    Raises ValueError naming the first layer bitsandbytes has repacked already (see
    `_refuse_repacked`): nothing is changed then.
    """
    if "bitsandbytes" not in sys.modules:  # a model holding bitsandbytes layers has imported it
        return
    import bitsandbytes as bnb

    layers = [(name, m) for name, m in model.named_modules(prefix=prefix) if isinstance(m, bnb.nn.Linear4bit)]
    for name, module in layers:
        if _repacked(module):
            raise _refuse_repacked(name)
    for _, module in layers:
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantize(base) -> torch.Tensor:
    """The weight of a bitsandbytes Linear4bit or Linear8bitLt as a float32 (out, in) tensor: the
    values its plain-layout forward multiplies by: 4 bits, each NF4/FP4 level times its block's
    scale (double quantization: the scales dequantized first; QLoRA, Dettmers et al. 2023, §2-3);
    8 bits, each int8 row times its scale / 127 (LLM.int8(), Dettmers et al. 2022, §3.1).
    Reads without changing the layer, on every CPU path.

    Raises ValueError for a 4-bit weight bitsandbytes has repacked for its bfloat16 CPU kernel
    (its exact values are gone; `keep_plain_layout` prevents that)."""
    import bitsandbytes as bnb

    weight = base.weight
    if isinstance(weight, bnb.nn.Params4bit):
        if _repacked(base):
            raise _refuse_repacked("")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # LLM.int8: int8 rows and one float scale per row (SCB, the row's largest magnitude). Its first
    # forward moves the scales from the weight to the layer's state.
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale).float()
