"""The shared layer machinery: a module that wraps a base layer and adds per-adapter deltas.

A method's layer class subclasses `AdapterLayer`, creates its weights in `update_layer`, computes
its output in `forward`, and gives its weight update in `delta_weight(name)`; `merge` and `unmerge`
here use that one formula for every method whose update is additive.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class AdapterLayer(nn.Module, abc.ABC):
    # Attributes (ModuleDict or ParameterDict keyed by adapter name) holding trainable weights.
    adapter_layer_names: tuple[str, ...] = ()
    # Other per-adapter attributes (plain dicts or ModuleDicts without trainable weights).
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    # ---- the base layer, seen through the wrapper ---------------------------------------
    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `module.weight` (dtype checks, tied-weight logic) sees the base weight.
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for name in getattr(self, attr).keys():
                if name not in names:
                    names.append(name)
        return names

    # ---- what a method provides ------------------------------------------------------------
    @abc.abstractmethod
    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        """Create (or replace) this adapter's weights in the layer."""

    @abc.abstractmethod
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update this adapter adds to the base weight, in float32, shaped like the weight."""

    # ---- activation, trainability ----------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = [n for n in names if n in self.adapter_names]
        for attr in self.adapter_layer_names:
            for name, mod in getattr(self, attr).items():
                params = [mod] if isinstance(mod, nn.Parameter) else mod.parameters()
                for p in params:
                    p.requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ---- merging ----------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        base = self.get_base_layer()
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue  # merging twice changes nothing
            delta = self.delta_weight(name)
            weight = base.weight
            merged = weight.data.float() + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives NaN or inf weights; merge refused")
            weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = base.weight
            weight.data.copy_((weight.data.float() - self.delta_weight(name)).to(weight.dtype))
