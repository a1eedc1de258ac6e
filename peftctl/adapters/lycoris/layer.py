"""The layer machinery LoHa and LoKr share (PEFT's `LycorisLayer`): a method gives the factors it
trains (shapes and initialisation, in PEFT's order of random draws) and how they make the update
ΔW; this module creates them, runs the forward, the dropouts and merging.

Per adapter and layer: `r`, `alpha` (after rank_pattern / alpha_pattern), `scaling` = alpha / r,
`rank_dropout`, `module_dropout`. The forward is y = base(x) + op(x, ΔW) for each active adapter,
op the base layer's own linear map (F.linear, or the base convolution's with its stride, padding,
dilation and groups) without bias, and ΔW built from the factors cast to the activations' dtype
(never the activations upcast), shaped like the base weight (Linear: (out, in); Conv: (out,
in / groups, *kernel)). Merging adds ΔW (float32) to W; unmerging subtracts it.

Training only (as PEFT): module dropout leaves an adapter out of a layer's forward with probability
`module_dropout` (one draw per adapter and forward, made only when the rate is above 0); rank
dropout multiplies ΔW's output rows by a Bernoulli(1 - rank_dropout) mask, divided by the mask's
mean where the method says (`rank_dropout_rescaled`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.layer import AdapterLayer, compute_dtype
from peftctl.adapters.matching import pattern_value
from peftctl.bnb import keep_plain_layout

# A factor's initialisation: "zeros", or "kaiming" (Kaiming-uniform with a = sqrt(5), PEFT's; one
# draw from the global generator per factor, so a seed gives PEFT's factors).
ZEROS, KAIMING = "zeros", "kaiming"


class LycorisLayer(AdapterLayer):
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        for name in self.other_param_names:
            setattr(self, name, {})
        base = self.get_base_layer()
        if isinstance(base, nn.Conv2d | nn.Conv1d):
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self.kernel_size: tuple[int, ...] = tuple(base.kernel_size)
            self.weight_shape = (base.out_channels, base.in_channels // base.groups, *self.kernel_size)
        else:  # nn.Linear and bitsandbytes' linears (whose stored weight is packed)
            self.in_features, self.out_features = base.in_features, base.out_features
            self.kernel_size = ()
            self.weight_shape = (base.out_features, base.in_features)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())

    # ---- what each method provides ------------------------------------------------------------------
    def factors(self, r: int, config) -> list[tuple[str, tuple[int, ...], str]]:
        """(attribute, shape, init) of each factor of a new adapter of rank `r`, in PEFT's order of
        initialisation."""
        raise NotImplementedError

    def adapter_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """ΔW (scaling included) from the factors cast to `dtype`, shaped like the base weight."""
        raise NotImplementedError

    def rank_dropout_rescaled(self, adapter_name: str) -> bool:
        """Whether rank dropout's mask is divided by its mean."""
        raise NotImplementedError

    def record_options(self, adapter_name: str, config) -> None:
        """Store the method's own per-adapter options (e.g. LoKr's rank_dropout_scale)."""

    # ---- creating an adapter ----------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        r = pattern_value(config.rank_pattern, module_name, config.r, "rank_pattern")
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha, "alpha_pattern")
        self.r[adapter_name], self.alpha[adapter_name], self.scaling[adapter_name] = r, alpha, alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.record_options(adapter_name, config)
        for attr in self.adapter_layer_names:  # replacing an adapter: its old factors go
            if adapter_name in getattr(self, attr):
                del getattr(self, attr)[adapter_name]
        device = self.get_base_layer().weight.device
        for attr, shape, init in self.factors(r, config):
            if device.type == "meta":
                value = torch.empty(shape, device="meta")
            else:
                value = torch.empty(shape)  # drawn on the CPU, as PEFT, then moved
                if init == ZEROS:
                    nn.init.zeros_(value)
                else:
                    nn.init.kaiming_uniform_(value, a=math.sqrt(5))
                value = value.to(device)
            getattr(self, attr)[adapter_name] = nn.Parameter(value)
        self.set_adapter(self.active_adapters, trainable=False)
        self.match_mode(adapter_name)

    # ---- forward ------------------------------------------------------------------------------------
    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if self.kernel_size:
            return base._conv_forward(x, weight, None)  # the base's stride, padding (and its mode), dilation, groups
        return F.linear(x, weight)

    def _training_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        weight = self.adapter_weight(adapter_name, dtype)
        p = self.rank_dropout[adapter_name]
        if p > 0:
            keep = (torch.rand(weight.shape[0], device=weight.device) > p).to(dtype)
            if self.rank_dropout_rescaled(adapter_name):
                # The mean is at least 1/rows unless every row is dropped (then the update is 0).
                keep = keep / keep.mean().clamp_min(1 / weight.shape[0])
            weight = weight * keep.view(-1, *[1] * (weight.dim() - 1))
        return weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            raise ValueError(f"{type(self).__module__.split('.')[-2]} layers take no adapter_names (a mixed batch), "
                             "as in PEFT")
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = compute_dtype(x)
        for name in self.active_adapters:
            if name not in self.r:
                continue
            if self.training:
                p = self.module_dropout[name]
                if p > 0 and torch.rand(1).item() <= p:
                    continue
                weight = self._training_weight(name, dtype)
            else:
                weight = self.adapter_weight(name, dtype)
            result = result + self._product(x.to(dtype), weight).to(result.dtype)
        return result

    # ---- merging and what inspect and the memory estimate read ---------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter_weight(adapter_name, torch.float32)

    def describe(self, adapter_name: str) -> str:
        if adapter_name not in self.r:
            return ""
        return f"r={self.r[adapter_name]} alpha={self.alpha[adapter_name]:g}"

    def saved_weights(self) -> int:
        # Each active adapter's ΔW is kept for the backward of the product with x.
        return len([n for n in self.active_adapters if n in self.r]) * math.prod(self.weight_shape)

    def __repr__(self) -> str:
        return type(self).__module__.split(".")[-2] + "." + super().__repr__()


def quantized_layer(linear_cls: type[LycorisLayer]) -> type[LycorisLayer]:
    """The method's layer over bitsandbytes' `Linear4bit` / `Linear8bitLt`: `linear_cls`'s forward
    around the quantized layer's, the 4-bit base kept in bitsandbytes' plain CPU layout
    (`peftctl.bnb`); merging into the quantized weight is refused (`AdapterLayer.base_params`)."""

    class QuantizedLinear(linear_cls):
        __doc__ = quantized_layer.__doc__

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
            keep_plain_layout(base_layer, module_name)
            super().__init__(base_layer, adapter_name, config, module_name=module_name)

    QuantizedLinear.__module__ = linear_cls.__module__
    QuantizedLinear.__qualname__ = "QuantizedLinear"
    return QuantizedLinear


def builtin_types(linear: type, conv2d: type, conv1d: type) -> list[tuple[type, type]]:
    """The base types PEFT's LyCORIS methods adapt: nn.Linear, nn.Conv2d, nn.Conv1d (not
    transformers' Conv1D nor embeddings)."""
    return [(nn.Conv2d, conv2d), (nn.Conv1d, conv1d), (nn.Linear, linear)]


def quantized_types(quantized: type) -> list[tuple[type, type]]:
    import bitsandbytes as bnb

    return [(bnb.nn.Linear4bit, quantized), (bnb.nn.Linear8bitLt, quantized)]


def rebuild_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A kernel-shaped factor from a core tensor t (r, r, k1, k2) and mode matrices wa (r, out),
    wb (r, in): Σ_ij t[i, j] wa[i, p] wb[j, q] → (out, in, k1, k2) (the Tucker form of FedPara's
    Proposition 3; PEFT's `make_weight_cp`)."""
    return torch.einsum("ijkl,ip,jr->prkl", t, wa, wb)
