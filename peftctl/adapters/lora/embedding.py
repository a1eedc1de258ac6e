"""LoRA over `nn.Embedding`: y = E[x] + (A^T[x] B^T) * scaling, A (r x vocab), B (dim x r).

As in PEFT: A starts at zero and B normal (the other way round from linear layers), there is no
dropout, and an embedding that scales its output (`embed_scale`, e.g. Gemma) scales the delta too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.lora.layer import LoraLayer


class Embedding(LoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "", **kwargs):
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.update_layer(adapter_name, config, module_name=module_name, **kwargs)

    def create_weights(self, adapter_name: str, r: int, lora_bias: bool, factory: dict) -> None:
        if lora_bias:
            raise ValueError("lora_bias is not supported on embedding layers")
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features), **factory))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r), **factory))
        self.lora_dropout[adapter_name] = nn.Identity()  # embeddings take no dropout

    def reset_weights(self, adapter_name: str, init: bool | str) -> None:
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def to_out_first(self, t: torch.Tensor) -> torch.Tensor:
        return t.T  # the weight is (vocab, dim); its outputs are the dim columns

    from_out_first = to_out_first

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_embedding_A[adapter_name].float()
        b = self.lora_embedding_B[adapter_name].float()
        return (b @ a).T * self.scaling[adapter_name]

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(ids, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def _embed_scale(self):
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return None
        return scale

    def lora_delta(self, adapter_name: str, ids: torch.Tensor, apply_dropout: bool = True,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """s * B A^T[ids] (times the base's `embed_scale`): integer ids (...) -> (..., embedding_dim),
        in `dtype` (default: the base weight's; float32 for a non-float one). No dropout."""
        dtype = dtype or self.get_base_layer().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        a = self.lora_embedding_A[adapter_name].to(dtype)
        b = self.lora_embedding_B[adapter_name].to(dtype)
        out = (self._embed(ids, a.T) @ b.T) * self.scaling[adapter_name]
        scale = self._embed_scale()
        return out if scale is None else out * scale

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.use_dora[adapter_name]:
            # PEFT's embedding DoRA: the whole output is re-scaled, factor * (E[x] + delta).
            factor = self.dora_factor(adapter_name).to(result.dtype)
            return factor * result + factor * self.lora_delta(adapter_name, x, dtype=result.dtype)
        return result + self.lora_delta(adapter_name, x, dtype=result.dtype)
