"""LoRA over `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`.

A is a convolution with the base layer's kernel, stride, padding and dilation into r channels;
B is a 1x1 convolution from r channels to the output (grouped like the base layer). The weight
update is B A with the 1x1 kernel squeezed: (out, r) @ (r, in * kernel).
"""

from __future__ import annotations

import torch
from torch import nn

from peftctl.adapters.lora.layer import LoraLayer, compute_dtype


class _ConvNd(LoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "", **kwargs):
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self._kernel_dim = base.weight.dim()
        self.update_layer(adapter_name, config, module_name=module_name, **kwargs)

    def create_weights(self, adapter_name: str, r: int, lora_bias: bool, factory: dict) -> None:
        base = self.get_base_layer()
        if r % base.groups != 0:
            raise ValueError(
                f"a {type(base).__name__} with groups={base.groups} needs a rank divisible by the groups (r={r})"
            )
        conv = type(base)
        ones = (1,) * (self._kernel_dim - 2)
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         dilation=base.dilation, bias=False, **factory)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups,
                                         bias=lora_bias, **factory)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * (self._kernel_dim - 2)  # PEFT's saved shape

    def factor_view(self) -> tuple[int, ...]:
        return (1, -1) + (1,) * (self._kernel_dim - 2)  # channels are dimension 1 of the output

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        if base.groups > 1:
            raise ValueError(f"merging is not supported for a {type(base).__name__} with groups > 1")
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        delta = b.flatten(1) @ a.flatten(1)
        return delta.view(base.weight.shape) * self.scaling[adapter_name]

    def lora_delta(self, adapter_name: str, x: torch.Tensor, apply_dropout: bool = True) -> torch.Tensor:
        """s * B(A(dropout(x))) + s * B's bias: (N, in_channels, *spatial) -> (N, out_channels,
        *spatial_out) (spatial_out as the base convolution gives), in the activations' dtype
        (autocast's when on); see `LoraLayer.lora_delta`."""
        dtype = compute_dtype(x)
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if apply_dropout:
            x = self.dropout(adapter_name, x)
        h = a._conv_forward(x.to(dtype), a.weight.to(dtype), None)
        return self.scaled_b(adapter_name, h, b._conv_forward)

    def base_output_without_bias(self, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        base = self.get_base_layer()
        if result is not None:
            if base.bias is None:
                return result
            return result - base.bias.to(result.dtype).view(self.factor_view())
        return base._conv_forward(x, base.weight.to(compute_dtype(x)), None)


class Conv1d(_ConvNd):
    pass


class Conv2d(_ConvNd):
    pass


class Conv3d(_ConvNd):
    pass
