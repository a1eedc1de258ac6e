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

Public bitsandbytes API: `dequantize_4bit`, `int8_vectorwise_dequant`. What is not documented sits
in one function each, behind a version check: the layer attribute `support_avx512bf16_for_cpu`
(bitsandbytes sets it at construction from its CPU check and reads it at each forward; versions
without the repacking lack it and have nothing to switch off) is set only on the bitsandbytes
versions it was checked with (`CPU_SWITCH_CHECKED`), in `_keep_layer_plain`; on another version that
has the attribute, the layer's forward is the public fallback `plain_forward` instead (the weight
dequantized by `dequantize_4bit`, then one matmul: what the plain path computes; tested to give the
same outputs and gradients). Whether a weight is repacked is read from its quantization state's
`packing_format_for_cpu` flag, in `_repacked` (absent: not repacked).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# bitsandbytes versions [from, to) whose undocumented CPU switch peftctl checked (0.50.2: it is read
# at every forward, and off it keeps the plain path; tests/test_quantized.py).
CPU_SWITCH_CHECKED = ((0, 50), (0, 51))


def switch_checked(version: str) -> bool:
    """Whether bitsandbytes `version` (e.g. "0.50.2") is one whose CPU switch was checked."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    low, high = CPU_SWITCH_CHECKED
    return low <= parts < high


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
    checked = switch_checked(bnb.__version__)
    for _, module in layers:
        _keep_layer_plain(module, checked)


def _keep_layer_plain(layer, checked: bool) -> None:
    """The one place peftctl switches off bitsandbytes' CPU repacking of a Linear4bit: its
    undocumented `support_avx512bf16_for_cpu` set to False on a `checked` version; elsewhere, where
    the layer has it, its forward replaced by the public `plain_forward` (which never repacks)."""
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        return  # a bitsandbytes without the repacking: nothing to switch off
    if checked:
        layer.support_avx512bf16_for_cpu = False
    elif "forward" not in vars(layer):
        layer.forward = functools.partial(plain_forward, layer)  # an instance attribute shadows the class's


def plain_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """A Linear4bit's output on bitsandbytes' plain CPU path, through its public API only: the weight
    dequantized (`dequantize_4bit`) to the layer's compute dtype (x's when unset), x @ W.T + bias in
    it, returned in x's dtype; the gradient flows to x (and a trainable bias). x: (..., in_features)
    -> (..., out_features). Off the CPU, the layer's own forward (the repacking is CPU-only)."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    if x.device.type != "cpu":
        return type(layer).forward(layer, x)
    weight = layer.weight
    state = getattr(weight, "quant_state", None) or layer.quant_state
    dtype = layer.compute_dtype or x.dtype
    w = bnb.functional.dequantize_4bit(weight.data, state).to(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), w, bias).to(x.dtype)


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
