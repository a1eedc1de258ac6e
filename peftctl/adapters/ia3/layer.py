"""(IA)³ layers: what they share (`IA3Layer`), the layer classes, which class wraps which base
module (`dispatch`), and PEFT's `add_weighted_adapter` for (IA)³.

Per adapter a vector l (float32, on the base weight's device), shaped as PEFT saves it (`...ia3_l`):
linear and Conv1D layers (out, 1) when the output is scaled, (1, in) when the input is (the
`feedforward_modules`); convolutions (1, C, 1, 1) (2d) or (1, C, 1, 1, 1) (3d), C the output or input
channels. The forward multiplies the activations by l cast to their dtype (the activations are never
upcast); the vectors of several active adapters multiply. Merging scales the base weight's rows
(output) or columns (input) by l, and for output scaling the bias too: W' = diag(l) W, b' = l ⊙ b,
or W' = W diag(l) (Liu et al. 2022, §3.3); unmerging divides again, exactly (PEFT divides by
l + 1e-8), and is refused where l has a zero.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from peftctl.adapters.layer import AdapterLayer, LayerTypes
from peftctl.adapters.modules_to_save import check_combinable_copies, start_from_source_copies
from peftctl.bnb import keep_plain_layout


class IA3Layer(AdapterLayer):
    adapter_layer_names = ("ia3_l",)
    other_param_names = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        # Per adapter (PEFT decides once per layer, from the first adapter's config): scales the input.
        self.is_feedforward: dict[str, bool] = {}

    # ---- what each layer type provides ----------------------------------------------------------
    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    def activation_view(self, vec: torch.Tensor) -> torch.Tensor:
        """The vector as it broadcasts over an input or output activation."""
        raise NotImplementedError

    def weight_factor(self, adapter_name: str) -> torch.Tensor:
        """The vector (float32) as it multiplies the base weight in a merge."""
        raise NotImplementedError

    # ---- creating an adapter ----------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        feedforward = config.is_feedforward(module_name)
        shape = self.vector_shape(feedforward)
        weight = self.get_base_layer().weight
        if weight.device.type == "meta":
            value = torch.empty(shape, device="meta")
        else:
            # Drawn first whatever the init, as PEFT does: a seed gives PEFT's vectors (init false).
            value = torch.randn(shape)
            if config.init_ia3_weights:
                value.fill_(1.0)
            value = value.to(weight.device)
        self.ia3_l[adapter_name] = nn.Parameter(value)
        self.is_feedforward[adapter_name] = feedforward
        self.set_adapter(self.active_adapters, trainable=False)
        self.match_mode(adapter_name)

    # ---- forward ------------------------------------------------------------------------------------
    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(product of the active input vectors, product of the active output vectors), or None."""
        scale_in = scale_out = None
        for name in self.active_adapters:
            vec = self.ia3_l[name]
            if self.is_feedforward[name]:
                scale_in = vec if scale_in is None else scale_in * vec
            else:
                scale_out = vec if scale_out is None else scale_out * vec
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            raise ValueError("IA3 layers take no adapter_names (a mixed batch): PEFT ignores them for IA3")
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale_in, scale_out = self._scales()
        if scale_in is not None:
            x = x * self.activation_view(scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = result * self.activation_view(scale_out).to(result.dtype)
        return result

    # ---- merging ------------------------------------------------------------------------------------
    def _bias_factor(self, adapter_name: str) -> torch.Tensor:
        return self.ia3_l[adapter_name].detach().float().flatten()

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W ⊙ (l - 1) for the base weight W before any merge: what merging adds to the weight."""
        return self.unmerged_base_params()["weight"] * (self.weight_factor(adapter_name) - 1)

    def merged_params(self, adapter_name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {**params, "weight": params["weight"] * self.weight_factor(adapter_name)}
        if not self.is_feedforward[adapter_name] and "bias" in params:
            out["bias"] = params["bias"] * self._bias_factor(adapter_name)
        return out

    def unmerged_params(self, adapter_name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if bool((self.ia3_l[adapter_name] == 0).any()):
            raise ValueError(f"adapter {adapter_name!r} scales some features by exactly 0: merged, those weights "
                             "are 0 and cannot be divided back out, so it cannot be unmerged")
        out = {**params, "weight": params["weight"] / self.weight_factor(adapter_name)}
        if not self.is_feedforward[adapter_name] and "bias" in params:
            out["bias"] = params["bias"] / self._bias_factor(adapter_name)
        return out

    # ---- what inspect and the memory estimate read ----------------------------------------------
    def describe(self, adapter_name: str) -> str:
        if adapter_name not in self.is_feedforward:
            return ""
        return "scales input" if self.is_feedforward[adapter_name] else "scales output"

    def saved_activations(self) -> tuple[bool, int]:
        # Input scaling keeps the input (l's gradient is x ⊙ dL/d(l ⊙ x)); output scaling keeps the
        # base output instead (l's gradient is base(x) ⊙ dL/dy).
        ff = self.is_feedforward.values()
        return any(ff), (0 if all(ff) else self.out_features)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Linear(IA3Layer):
    """(IA)³ over `nn.Linear` and transformers' `Conv1D` (weight stored (in, out): fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = not isinstance(base, nn.Linear) and type(base).__name__ == "Conv1D"
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.update_layer(adapter_name, config, module_name=module_name)

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def activation_view(self, vec: torch.Tensor) -> torch.Tensor:
        return vec.flatten()  # features are the last dimension

    def weight_factor(self, adapter_name: str) -> torch.Tensor:
        vec = self.ia3_l[adapter_name].detach().float()
        return vec.T if self.fan_in_fan_out else vec


class _ConvNd(IA3Layer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self._kernel_dim = base.weight.dim()
        self.update_layer(adapter_name, config, module_name=module_name)

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features if feedforward else self.out_features) + (1,) * (self._kernel_dim - 2)

    def activation_view(self, vec: torch.Tensor) -> torch.Tensor:
        return vec  # (1, C, 1, ...): channels are dimension 1

    def weight_factor(self, adapter_name: str) -> torch.Tensor:
        """Output scaling: l over the weight's first dimension. Input scaling: over its second, which
        with groups holds in_channels / groups channels per output channel (PEFT's layout)."""
        vec = self.ia3_l[adapter_name].detach().float()
        if not self.is_feedforward[adapter_name]:
            return vec.transpose(0, 1)
        base = self.get_base_layer()
        if base.groups == 1:
            return vec
        per_in, per_out = base.in_channels // base.groups, base.out_channels // base.groups
        vec = vec.reshape(base.groups, 1, per_in, *vec.shape[2:]).expand(base.groups, per_out, per_in, *vec.shape[2:])
        return vec.reshape(base.out_channels, per_in, *vec.shape[3:])


class Conv2d(_ConvNd):
    pass


class Conv3d(_ConvNd):
    pass


class QuantizedLinear(Linear):
    """(IA)³ over bitsandbytes' `Linear4bit` and `Linear8bitLt`: the forward is `Linear`'s around the
    quantized layer's; the 4-bit base stays in bitsandbytes' plain CPU layout (`peftctl.bnb`); merging
    into the quantized weight is refused (`AdapterLayer.base_params`), as in PEFT."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        keep_plain_layout(base_layer, module_name)
        super().__init__(base_layer, adapter_name, config, module_name=module_name)


# ---- dispatch: which layer class wraps which base module ----------------------------------------


def _builtin_types() -> list[tuple[type, type[IA3Layer]]]:
    from transformers.pytorch_utils import Conv1D

    # PEFT's IA3 adapts these (not nn.Conv1d nor embeddings).
    return [(nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d), (nn.Linear, Linear), (Conv1D, Linear)]


def _quantized_types() -> list[tuple[type, type[IA3Layer]]]:
    import bitsandbytes as bnb

    return [(bnb.nn.Linear4bit, QuantizedLinear), (bnb.nn.Linear8bitLt, QuantizedLinear)]


LAYER_TYPES = LayerTypes("IA3", _builtin_types, _quantized_types)
dispatch = LAYER_TYPES.dispatch


# ---- add_weighted_adapter ---------------------------------------------------------------------------


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "linear", **options) -> None:
    """A new (IA)³ adapter whose vector in each layer is sum_i weights[i] * l_i over the adapters
    present there (PEFT's IA3Model.add_weighted_adapter). It adapts exactly the layers that hold one
    of them, scaling the same side; a module one of them trains in full (modules_to_save) starts
    from that trained copy (PEFT starts from the base module). It starts inactive and frozen.
    ValueError: another combination type or option, an existing name, a layer the adapters scale on
    different sides, or two adapters that train copies of the same module."""
    if combination_type != "linear":
        raise ValueError(f"IA3 adapters combine as the weighted sum of their vectors (combination_type 'linear', "
                         f"as PEFT), not {combination_type!r}")
    if options:
        raise ValueError(f"add_weighted_adapter for IA3 adapters takes no {', '.join(sorted(options))} "
                         "(PEFT's takes adapters, weights and adapter_name only)")
    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists")
    model._check_names(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    check_combinable_copies(model, adapters)
    layers = {name: layer for name, layer in model.model.named_modules()
              if isinstance(layer, IA3Layer) and any(a in layer.ia3_l for a in adapters)}
    feedforward = []
    for name, layer in layers.items():
        sides = {layer.is_feedforward[a] for a in adapters if a in layer.ia3_l}
        if len(sides) > 1:
            raise ValueError(f"the adapters scale {name}'s input and its output: their vectors cannot be added")
        if sides == {True}:
            feedforward.append(name)
    configs = [model.peft_config[a] for a in adapters]
    saved = sorted({m for c in configs for m in c.modules_to_save or []})
    config = configs[0].model_copy(update={
        "target_modules": list(layers), "exclude_modules": None, "modules_to_save": saved or None,
        # Exactly these paths (a list entry would be a plain suffix, which a longer path may end with too).
        "feedforward_modules": "|".join(re.escape(n) for n in feedforward) if feedforward else [],
    })
    model.inject_adapter(adapter_name, config)
    with torch.no_grad():
        for layer in layers.values():
            target = layer.ia3_l[adapter_name]
            target.zero_()
            for a, w in zip(adapters, weights, strict=True):
                if a in layer.ia3_l:
                    target.add_(layer.ia3_l[a] * w)
        start_from_source_copies(model, adapters, adapter_name)
    model._apply_trainability()
