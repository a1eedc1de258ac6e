"""LoKr layers over nn.Linear, nn.Conv2d, nn.Conv1d and bitsandbytes' linears, and `dispatch`.

Sizes: out = a · b, in = c · d (in = in_channels / groups for a convolution), each split by
`factorization` (PEFT's). Factors (float32, PEFT's names and shapes, which make the saved keys):
- W1: lokr_w1 (a, c), or with `decompose_both` and r < max(a, c) / 2, lokr_w1_a (a, r), lokr_w1_b (r, c);
- W2 when r >= max(b, d) / 2: lokr_w2 (b, d, *kernel); else with `use_effective_conv2d` on a
  kernel larger than 1: lokr_t2 (r, r, k1, k2) (Conv1d: (r, r, k, 1)), lokr_w2_a (r, b), lokr_w2_b
  (r, d), W2 = `rebuild_cp`; else lokr_w2_a (b, r), lokr_w2_b (r, d · kernel).
ΔW = kron(W1, W2) · alpha / r (W1 given two trailing unit dimensions when W2 has four), reshaped
to the base weight's shape: PEFT's `make_kron`, layout included (for a Conv1d with a full W2 that
layout is torch.kron's of a 2-d and a 3-d tensor, as PEFT).
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


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dimension (PEFT's `factorization`, from LyCORIS): (factor, dimension /
    factor) when a positive factor divides it; else the most balanced split whose smaller part is
    at most `factor` (-1: no limit), the smaller part first. E.g. 128 → (8, 16); 127 → (1, 127);
    128 with factor 4 → (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch.kron(x, y) (the tensor of fewer dimensions given leading unit ones, as torch.kron does),
    by broadcasting: the same products, for any strides (torch.kron fails on some of the strides
    `rebuild_cp` gives a Conv1d's W2, and so does PEFT's LoKr there)."""
    n = max(x.dim(), y.dim())
    xs, ys = (1,) * (n - x.dim()) + tuple(x.shape), (1,) * (n - y.dim()) + tuple(y.shape)
    interleaved_x = [d for s in xs for d in (s, 1)]
    interleaved_y = [d for s in ys for d in (1, s)]
    out = x.reshape(interleaved_x) * y.reshape(interleaved_y)
    return out.reshape([a * b for a, b in zip(xs, ys, strict=True)])


class LoKrLayer(LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_param_names = (*LycorisLayer.other_param_names, "rank_dropout_scale")

    def record_options(self, adapter_name: str, config) -> None:
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale

    def factors(self, r: int, config) -> list[tuple[str, tuple[int, ...], str]]:
        kernel = self.kernel_size
        a, b = factorization(self.weight_shape[0], config.decompose_factor)
        c, d = factorization(self.weight_shape[1], config.decompose_factor)
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        effective = config.use_effective_conv2d and bool(kernel) and any(k != 1 for k in kernel)
        init = config.init_weights
        # PEFT's three initialisations: which factor starts at zero (none for init_weights false).
        w1_zero, w2_zero = init is True, init == "lycoris"
        out = [("lokr_w1", (a, c), ZEROS if w1_zero else KAIMING)] if full_w1 else [
            ("lokr_w1_a", (a, r), ZEROS if w1_zero else KAIMING), ("lokr_w1_b", (r, c), KAIMING)]
        if full_w2:
            out.append(("lokr_w2", (b, d, *kernel), ZEROS if w2_zero else KAIMING))
        elif effective:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            # PEFT initialises W2a, W2b, then the core.
            out += [("lokr_w2_a", (r, b), KAIMING), ("lokr_w2_b", (r, d), ZEROS if w2_zero else KAIMING),
                    ("lokr_t2", core, KAIMING)]
        else:
            out += [("lokr_w2_a", (b, r), KAIMING), ("lokr_w2_b", (r, d * math.prod(kernel)),
                                                     ZEROS if w2_zero else KAIMING)]
        return out

    def adapter_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        def get(attr: str) -> torch.Tensor:
            return getattr(self, attr)[adapter_name].to(dtype)

        w1 = get("lokr_w1") if adapter_name in self.lokr_w1 else get("lokr_w1_a") @ get("lokr_w1_b")
        if adapter_name in self.lokr_w2:
            w2 = get("lokr_w2")
        elif adapter_name in self.lokr_t2:
            w2 = rebuild_cp(get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
        else:
            w2 = get("lokr_w2_a") @ get("lokr_w2_b")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (kron(w1, w2) * self.scaling[adapter_name]).reshape(self.weight_shape)

    def rank_dropout_rescaled(self, adapter_name: str) -> bool:
        return self.rank_dropout_scale[adapter_name]


class Linear(LoKrLayer):
    """LoKr over `nn.Linear`."""

    def __init__(self, base_layer, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        self.update_layer(adapter_name, config, module_name=module_name)


class Conv2d(Linear):
    """LoKr over `nn.Conv2d` (grouped too)."""


class Conv1d(Linear):
    """LoKr over `nn.Conv1d`."""


QuantizedLinear = quantized_layer(Linear)
LAYER_TYPES = LayerTypes("LoKr", lambda: builtin_types(Linear, Conv2d, Conv1d), lambda: quantized_types(QuantizedLinear))
dispatch = LAYER_TYPES.dispatch
