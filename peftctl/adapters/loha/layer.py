"""LoHa layers over nn.Linear, nn.Conv2d, nn.Conv1d and bitsandbytes' linears, and `dispatch`.

Factors (float32, PEFT's names and shapes, which make the saved keys `...hada_w1_a` etc.):
- flattened (Linear; a convolution without `use_effective_conv2d` or with a kernel of 1):
  hada_w1_a, hada_w2_a (out, r); hada_w1_b, hada_w2_b (r, in · kernel), in = in_channels / groups;
- effective convolution: hada_t1, hada_t2 (r, r, k1, k2) (Conv1d: (r, r, k, 1)); hada_w1_a, hada_w2_a
  (r, out); hada_w1_b, hada_w2_b (r, in).
ΔW = rebuild(1) ⊙ rebuild(2) · alpha / r, rebuild(i) = Wia Wib or `rebuild_cp(ti, Wia, Wib)`
(FedPara, eq. 2 and Proposition 3), reshaped to the base weight's shape. The product goes through
`HadamardProduct`, which keeps only the factors for the backward (PEFT's `HadaWeight`), not the two
(out, in) rebuilt matrices.
"""

from __future__ import annotations

import math

import torch

from peftctl.adapters.layer import LayerTypes
from peftctl.adapters.lycoris.layer import (
    KAIMING,
    ZEROS,
    LycorisLayer,
    builtin_types,
    quantized_layer,
    quantized_types,
    rebuild_cp,
)


def _rebuild(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return factors[0] @ factors[1] if len(factors) == 2 else rebuild_cp(*factors)


class HadamardProduct(torch.autograd.Function):
    """rebuild(f1) ⊙ rebuild(f2) · scale, whose backward recomputes the rebuilt matrices from the
    factors instead of keeping them: d/dfi = (grad · scale ⊙ rebuild(other)) back through rebuild(fi)."""

    @staticmethod
    def forward(ctx, scale: float, n: int, *factors: torch.Tensor) -> torch.Tensor:
        ctx.scale, ctx.n = scale, n
        ctx.save_for_backward(*factors)
        return _rebuild(factors[:n]) * _rebuild(factors[n:]) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        factors, n = ctx.saved_tensors, ctx.n
        grads: list[torch.Tensor | None] = [None] * len(factors)
        with torch.enable_grad():
            parts = [tuple(f.detach().requires_grad_() for f in fs) for fs in (factors[:n], factors[n:])]
            rebuilt = [_rebuild(p) for p in parts]
        for side, (part, offset) in enumerate(((parts[0], 0), (parts[1], n))):
            wanted = [i for i in range(len(part)) if ctx.needs_input_grad[2 + offset + i]]
            if not wanted:
                continue
            upstream = grad * ctx.scale * rebuilt[1 - side].detach()
            got = torch.autograd.grad(rebuilt[side], [part[i] for i in wanted], upstream)
            for i, g in zip(wanted, got, strict=True):
                grads[offset + i] = g
        return None, None, *grads


class LoHaLayer(LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def factors(self, r: int, config) -> list[tuple[str, tuple[int, ...], str]]:
        out, in_, kernel = self.weight_shape[0], self.weight_shape[1], self.kernel_size
        w2b_init = ZEROS if config.init_weights else KAIMING
        if config.use_effective_conv2d and kernel and any(k != 1 for k in kernel):
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            return [("hada_w1_a", (r, out), KAIMING), ("hada_w1_b", (r, in_), KAIMING),
                    ("hada_w2_a", (r, out), KAIMING), ("hada_w2_b", (r, in_), w2b_init),
                    ("hada_t1", core, KAIMING), ("hada_t2", core, KAIMING)]
        flat = in_ * math.prod(kernel)
        return [("hada_w1_a", (out, r), KAIMING), ("hada_w1_b", (r, flat), KAIMING),
                ("hada_w2_a", (out, r), KAIMING), ("hada_w2_b", (r, flat), w2b_init)]

    def adapter_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        def get(attr: str) -> torch.Tensor:
            return getattr(self, attr)[adapter_name].to(dtype)

        first = (get("hada_w1_a"), get("hada_w1_b"))
        second = (get("hada_w2_a"), get("hada_w2_b"))
        if adapter_name in self.hada_t1:  # rebuild_cp takes (core, mode of out, mode of in)
            first, second = (get("hada_t1"), *first), (get("hada_t2"), *second)
        weight = HadamardProduct.apply(self.scaling[adapter_name], len(first), *first, *second)
        return weight.reshape(self.weight_shape)

    def rank_dropout_rescaled(self, adapter_name: str) -> bool:
        return True


class Linear(LoHaLayer):
    """LoHa over `nn.Linear`."""

    def __init__(self, base_layer, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        self.update_layer(adapter_name, config, module_name=module_name)


class Conv2d(Linear):
    """LoHa over `nn.Conv2d` (grouped too)."""


class Conv1d(Linear):
    """LoHa over `nn.Conv1d`."""


QuantizedLinear = quantized_layer(Linear)
LAYER_TYPES = LayerTypes("LoHa", lambda: builtin_types(Linear, Conv2d, Conv1d), lambda: quantized_types(QuantizedLinear))
dispatch = LAYER_TYPES.dispatch
