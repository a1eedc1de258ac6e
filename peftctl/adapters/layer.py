"""The shared layer machinery: a module that wraps a base layer and adds per-adapter deltas.

A method's layer class subclasses `AdapterLayer`, creates its weights in `update_layer`, computes
its output in `forward`, and gives its weight update in `delta_weight(name)`. Merging folds
adapters into the base layer's parameters one after another: `merged_params(name, params)` says
what an adapter does to them (by default: weight + delta_weight) and `unmerged_params` undoes it;
methods whose update is not additive (DoRA) or that touch the bias override those two.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable

import torch
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an adapter computes in: autocast's when it is on, else the activations'."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class AdapterLayer(nn.Module, abc.ABC):
    # Attributes (ModuleDict or ParameterDict keyed by adapter name) holding trainable weights.
    adapter_layer_names: tuple[str, ...] = ()
    # Other per-adapter attributes (plain dicts or ModuleDicts without trainable weights).
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        # A new layer takes the mode (train / eval) of the module it wraps, so that adding an adapter
        # to a model in eval mode gives no dropout in training mode.
        self.training = base_layer.training
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Per-row adapter names for a mixed batch (set by the model for one forward, else None).
        self.batch_adapter_names: list[str] | None = None

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
    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        """Create (or replace) this adapter's weights in the layer (`module_name`: its path, for
        per-module settings and errors)."""

    @abc.abstractmethod
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update this adapter adds to the base weight, in float32, shaped like the weight."""

    def describe(self, adapter_name: str) -> str:
        """A few words on this adapter in this layer, for `peftctl inspect RECIPE` (e.g. "r=8")."""
        return ""

    def saved_activations(self) -> tuple[bool, int]:
        """What autograd keeps per token for this layer's adapters in training, for the memory
        estimate (`peftctl.memory`): whether it keeps the layer's input (a tensor other layers
        reading the same input share), and how many more elements (adapter intermediates, or the
        base output an output-side factor needs for its gradient). Default: the input only."""
        return True, 0

    def saved_weights(self) -> int:
        """Elements this layer's adapters keep for the backward pass whatever the number of tokens
        (LoHa's and LoKr's full-size ΔW, the weight of their product with the input), for the
        memory estimate. Default: none."""
        return 0

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors saved for one adapter, keyed relative to this layer without the adapter's name
        (`lora_A.weight`, `lora_magnitude_vector`): PEFT's key layout."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                out[attr] = item
            else:
                out.update({f"{attr}.{p}": t for p, t in item.named_parameters()})
        return out

    # ---- activation, trainability ----------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = [n for n in names if n in self.adapter_names]
        for attr in self.adapter_layer_names:
            for name, mod in getattr(self, attr).items():
                params = [mod] if isinstance(mod, nn.Parameter) else mod.parameters()
                for p in params:
                    p.requires_grad_(trainable and name in self.active_adapters)

    def match_mode(self, adapter_name: str) -> None:
        """Put this adapter's modules (dropout, A, B, ...) in the layer's own mode (train / eval)."""
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr)
            if isinstance(container, nn.Module):  # the ModuleDict / ParameterDict and what it holds
                container.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ---- merging ----------------------------------------------------------------------------
    def base_params(self) -> dict[str, torch.Tensor]:
        """The base layer's parameters that merging changes, in float32 copies."""
        base = self.get_base_layer()
        if not base.weight.is_floating_point():
            raise ValueError(
                f"cannot merge into a quantized {type(base).__name__} weight ({base.weight.dtype}); "
                "load the base model unquantized to merge"
            )
        out = {"weight": base.weight.detach().float().clone()}
        if getattr(base, "bias", None) is not None:
            out["bias"] = base.bias.detach().float().clone()
        return out

    def merged_params(self, adapter_name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`params` (float32) with this adapter folded in."""
        return {**params, "weight": params["weight"] + self.delta_weight(adapter_name)}

    def unmerged_params(self, adapter_name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`params` (float32) with this adapter, the last one merged, taken out again."""
        return {**params, "weight": params["weight"] - self.delta_weight(adapter_name)}

    def _write_base(self, params: dict[str, torch.Tensor]) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            for key, value in params.items():
                target = getattr(base, key)
                target.data.copy_(value.to(target.dtype))

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue  # merging twice changes nothing
            with torch.no_grad():
                params = self.merged_params(name, self.base_params())
            if safe_merge and not all(torch.isfinite(v).all() for v in params.values()):
                raise ValueError(f"merging adapter {name!r} gives NaN or inf weights; merge refused")
            self._write_base(params)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            with torch.no_grad():
                params = self.unmerged_params(name, self.base_params())
            self._write_base(params)
            self.merged_adapters.pop()

    def unmerged_base_params(self) -> dict[str, torch.Tensor]:
        """The base parameters as they were before any merge (float32 copies; the layer is unchanged)."""
        params = self.base_params()
        with torch.no_grad():
            for name in reversed(self.merged_adapters):
                params = self.unmerged_params(name, params)
        return params


class LayerTypes:
    """Which of a method's layer classes wraps which base-module type: a method's `dispatch`.

    `builtin()` gives the (base type, layer class) pairs, looked up on first use (so that torch
    layer modules and transformers load only then); `quantized()` gives those for bitsandbytes'
    layers, added once bitsandbytes is imported (a model holding its layers has imported it;
    peftctl never imports it for a model without them). The first isinstance match wins; `register`
    puts an entry first (bitsandbytes' linears subclass nn.Linear, so they must come first).
    """

    def __init__(self, method: str, builtin: Callable[[], list[tuple[type, type]]],
                 quantized: Callable[[], list[tuple[type, type]]] | None = None):
        self.method = method
        self._builtin, self._quantized = builtin, quantized
        self._entries: list[tuple[type, type]] = []
        self._quantized_added = quantized is None

    def register(self, base_type: type, layer_cls: type) -> None:
        """Make `layer_cls` the layer for base modules of `base_type`, before the other entries."""
        self.entries().insert(0, (base_type, layer_cls))

    def entries(self) -> list[tuple[type, type]]:
        if not self._entries:
            self._entries.extend(self._builtin())
        if not self._quantized_added and "bitsandbytes" in sys.modules:
            self._quantized_added = True
            for base_type, cls in self._quantized():
                self.register(base_type, cls)
        return self._entries

    def dispatch(self, target: nn.Module, adapter_name: str, config, module_name: str, **state) -> AdapterLayer:
        """The layer wrapping `target` for this adapter, or a TypeError naming the module and its type.
        `state`: what the method's `before_inject` made (`state=...`), handed to the layer class."""
        for base_type, cls in self.entries():
            if isinstance(target, base_type):
                return cls(target, adapter_name, config, module_name=module_name, **state)
        supported = ", ".join(sorted(f"{t.__module__}.{t.__name__}" for t, _ in self.entries()))
        raise TypeError(
            f"module {module_name} is a {type(target).__module__}.{type(target).__name__}; "
            f"{self.method} here supports: {supported}"
        )
