"""LoRA layers: y = base(x) + B(A(dropout(x))) * scaling.

The forward adds only the work the formula needs: no dropout call when the rate is 0, the delta is
computed as B(A(x)) in the activations' dtype (the float32 adapter weights are cast, never the
activations upcast), and the scaling multiplies the small r-wide intermediate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.layer import AdapterLayer


class LoraLayer(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _set_hparams(self, adapter_name: str, config, r: int, lora_alpha: float) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply this adapter's scaling (PEFT's `set_scale` keeps alpha/r as the base)."""
        r, alpha = self.r[adapter_name], self.lora_alpha[adapter_name]
        self.scaling[adapter_name] = scale * alpha / r

    def _dropout(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        drop = self.lora_dropout[adapter_name]
        return x if isinstance(drop, nn.Identity) else drop(x)


class Linear(LoraLayer):
    """LoRA over `nn.Linear`."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, **kwargs):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config, r: int | None = None, lora_alpha: float | None = None):
        r = config.r if r is None else r
        lora_alpha = config.lora_alpha if lora_alpha is None else lora_alpha
        self._set_hparams(adapter_name, config, r, lora_alpha)
        weight = self.get_base_layer().weight
        # Adapter weights live in float32 (stable optimizer updates) on the base weight's device;
        # created with nn.Linear's own init first, as PEFT does, so a seed gives PEFT's numbers.
        factory = {"device": weight.device, "dtype": torch.float32}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        if config.init_lora_weights is True and weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            result = result + self.lora_delta(x, name)
        return result

    def lora_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """B(A(dropout(x))) * scaling, computed in x's dtype."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        h = F.linear(self._dropout(adapter_name, x), a.to(dtype))
        scale = self.scaling[adapter_name]
        if scale != 1.0:
            h = h * scale
        return F.linear(h, b.to(dtype))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch(target: nn.Module, adapter_name: str, config, module_name: str, **kwargs) -> AdapterLayer:
    """The LoRA layer class for a base module, or a TypeError naming what is unsupported."""
    if isinstance(target, nn.Linear):
        return Linear(target, adapter_name, config, **kwargs)
    raise TypeError(
        f"module {module_name} is a {type(target).__module__}.{type(target).__name__}; "
        "LoRA here supports: torch.nn.Linear"
    )
