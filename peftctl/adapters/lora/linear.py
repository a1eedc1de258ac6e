"""LoRA over `nn.Linear` and transformers' `Conv1D` (GPT-2 style, weight stored (in, out))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.lora.layer import LoraLayer, compute_dtype


class Linear(LoraLayer):
    base_weight_inits = ("pissa", "olora")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "", **kwargs):
        super().__init__(base_layer)
        base = self.get_base_layer()
        # transformers' Conv1D computes x @ W + b with W stored (in, out): PEFT's fan_in_fan_out.
        self.fan_in_fan_out = not isinstance(base, nn.Linear) and type(base).__name__ == "Conv1D"
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.update_layer(adapter_name, config, module_name=module_name, **kwargs)

    def create_weights(self, adapter_name: str, r: int, lora_bias: bool, factory: dict) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **factory)

    def to_out_first(self, t: torch.Tensor) -> torch.Tensor:
        return t.T if self.fan_in_fan_out else t

    from_out_first = to_out_first

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return self.from_out_first(b @ a) * self.scaling[adapter_name]

    def lora_delta(self, adapter_name: str, x: torch.Tensor, apply_dropout: bool = True) -> torch.Tensor:
        """s * B(A(dropout(x))) + s * B's bias: (..., in_features) -> (..., out_features), in the
        activations' dtype (autocast's when on); see `LoraLayer.lora_delta`."""
        dtype = compute_dtype(x)
        if apply_dropout:
            x = self.dropout(adapter_name, x)
        h = F.linear(x.to(dtype), self.lora_A[adapter_name].weight.to(dtype))
        return self.scaled_b(adapter_name, h, F.linear)

    def base_output_without_bias(self, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        bias = self.bias
        if result is not None:
            return result if bias is None else result - bias.to(result.dtype)
        weight = self.to_out_first(self.get_base_layer().weight)
        return F.linear(x, weight.to(compute_dtype(x)))
