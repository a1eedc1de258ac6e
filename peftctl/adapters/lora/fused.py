"""Fused forward paths for Llama-family decoder blocks whose projections carry LoRA adapters.

`enable_fused(model)` gives each supported module of a model an instance `forward` that computes
the same function with fewer kernels and less memory kept for the backward (`peftctl.kernels`):

- RMSNorm (Llama, Mistral, Qwen2, Qwen3): `kernels.norm.rms_norm`, which keeps its input and one
  float32 per row instead of a float32 copy of its input;
- the SwiGLU MLP of the same families: `kernels.lora.lora_mlp` (gate and up share one `x @ A^T`;
  silu(gate) * up is recomputed in the backward, not kept);
- Llama attention: q, k and v from one `kernels.lora.project` call (one `x @ [A_q; A_k; A_v]^T`),
  the rotary embedding in one pass (`kernels.rope`), transformers' attention function for the
  model's attention implementation, o_proj through `project`; a packed batch that carries its
  sequence boundaries (`cu_seq_lens_q`, `max_length_q`) is attended sequence by sequence by
  `kernels.varlen` instead, with no mask.

Each fused forward checks, per call, that its modules are in a state the fused function computes
exactly: a projection is a plain `nn.Linear` (or bitsandbytes `Linear4bit`) with a frozen weight,
or a LoRA `Linear` over one with at most one active adapter, not DoRA, no `lora_bias`, no dropout
in training mode, no mixed batch (`adapter_names`), no hooks; no autocast; no KV cache; a frozen
norm weight. Otherwise the module's own forward runs, unchanged. So the fused forwards can stay
installed while adapters are added, switched, disabled or merged. `disable_fused(model)` removes
them. Numerically the fused functions equal the module graph up to rounding order (tested in
float64 on CPU and against derived bfloat16 tolerances on a GPU: tests/test_fused.py).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from peftctl.adapters.layer import AdapterLayer
from peftctl.kernels.lora import Projection, lora_mlp, project
from peftctl.kernels.norm import rms_norm
from peftctl.kernels.rope import apply_rope
from peftctl.kernels.varlen import varlen_attention

NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
ATTENTIONS = frozenset({"LlamaAttention"})
_MARK = "_peftctl_fused"


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def projection(layer: nn.Module, x: torch.Tensor) -> Projection | None:
    """`layer` (a linear, or a LoRA layer over one) as a `Projection` of input `x`, or None when
    its own forward must run (see the module docstring for the conditions)."""
    from peftctl.adapters.lora.layer import LoraLayer
    from peftctl.adapters.lora.linear import Linear

    if torch.is_autocast_enabled(x.device.type) or _hooked(layer):
        return None
    adapter = None
    base = layer
    if isinstance(layer, AdapterLayer):
        if not isinstance(layer, LoraLayer) or not isinstance(layer, Linear) or layer.fan_in_fan_out:
            return None
        base = layer.base_layer
        if isinstance(base, AdapterLayer) or layer.batch_adapter_names is not None:
            return None
        if layer.disable_adapters and layer.merged:
            return None  # its forward unmerges first
        active = [] if layer.disable_adapters or layer.merged else [
            n for n in layer.active_adapters if n in layer.lora_A]
        if len(active) > 1:
            return None
        if active:
            name = active[0]
            b = layer.lora_B[name]
            if layer.use_dora[name] or b.bias is not None or _hooked(b) or _hooked(layer.lora_A[name]):
                return None
            if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
                return None
            adapter = (layer.lora_A[name].weight, b.weight, layer.scaling[name])
    if _hooked(base):
        return None
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return None
    weight = base.weight
    if type(base) is nn.Linear:
        if weight.requires_grad or weight.dtype != x.dtype:
            return None
        quant_state = None
    elif type(base).__name__ == "Linear4bit":
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
            return None
        if (base.compute_dtype or x.dtype) != x.dtype:
            return None
    else:
        return None
    if adapter is None:
        return Projection(weight, bias, quant_state)
    return Projection(weight, bias, quant_state, *adapter)


def _norm_forward(self, hidden_states):
    weight = self.weight
    eps = getattr(self, "variance_epsilon", None)
    if (eps is None or weight.requires_grad or not hidden_states.is_floating_point()
            or torch.is_autocast_enabled(hidden_states.device.type)):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, weight, eps)


def _silu(module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _mlp_forward(self, x):
    projs = [projection(m, x) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    if any(p is None for p in projs) or not _silu(self):
        return type(self).forward(self, x)
    return lora_mlp(x, *projs)


def _attention_forward(self, hidden_states, *args, **kwargs):
    impl = self.config._attn_implementation or "eager"
    # A packed batch given by its boundaries (`data.packing`'s "cu_seqlens" layout) is attended
    # here, sequence by sequence (flash attention implementations take them themselves).
    packed = kwargs.get("cu_seq_lens_q") is not None and "flash" not in impl
    embeddings = kwargs.get("position_embeddings")
    unsupported = (args or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
                   or kwargs.get("output_attentions") or (self.training and self.attention_dropout > 0)
                   or embeddings is None or embeddings[0].dim() != 3 or embeddings[0].dtype != hidden_states.dtype)
    if unsupported:
        if packed:
            raise ValueError("a packed batch with cu_seq_lens needs training without a KV cache, attention "
                             "weights or attention dropout")
        return type(self).forward(self, hidden_states, *args, **kwargs)

    kwargs = dict(kwargs)
    for key in ("position_embeddings", "past_key_values", "cache"):
        kwargs.pop(key, None)
    attention_mask = kwargs.pop("attention_mask", None)
    lead = hidden_states.shape[:-1]
    qkv = [projection(m, hidden_states) for m in (self.q_proj, self.k_proj, self.v_proj)]
    if all(p is not None for p in qkv):
        q, k, v = project(hidden_states, tuple(qkv))
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    cos, sin = embeddings
    q = apply_rope(q.view(*lead, -1, self.head_dim), cos, sin)
    k = apply_rope(k.view(*lead, -1, self.head_dim), cos, sin)
    v = v.view(*lead, -1, self.head_dim)
    weights = None
    if packed:
        if lead[0] != 1:
            raise ValueError(f"a packed batch with cu_seq_lens is one row; got {lead[0]}")
        out = varlen_attention(q[0], k[0], v[0], kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"]), self.scaling)
    else:
        if impl == "eager":
            attend = sys.modules[type(self).__module__].eager_attention_forward
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            attend = ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                              dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                              **kwargs)
    out = out.reshape(*lead, -1).contiguous()
    out_proj = projection(self.o_proj, out)
    if out_proj is None:
        return self.o_proj(out), weights
    (out,) = project(out, (out_proj,))
    return out, weights


def varlen_supported(model: nn.Module, device) -> bool:
    """Whether a model with the fused forwards attends packed batches by their boundaries on
    `device` (`kernels.varlen`): Llama attention under SDPA, and on a GPU PyTorch's variable-length
    flash attention (on a CPU a loop over the sequences, for tests)."""
    from peftctl.kernels.varlen import available

    config = getattr(model, "config", None)
    has = any(type(m).__name__ in ATTENTIONS for m in model.modules())
    return has and getattr(config, "_attn_implementation", None) == "sdpa" and (
        device.type != "cuda" or available(device))


_FORWARDS = ((NORMS, _norm_forward, "rms_norm"), (MLPS, _mlp_forward, "mlp"), (ATTENTIONS, _attention_forward,
                                                                                "attention"))


def enable_fused(model: nn.Module) -> dict[str, int]:
    """Install the fused forwards on every supported module of `model` (idempotent). Returns how
    many modules of each kind now have one: {"rms_norm": n, "mlp": n, "attention": n}."""
    counts = {kind: 0 for _, _, kind in _FORWARDS}
    for module in model.modules():
        name = type(module).__name__
        for classes, forward, kind in _FORWARDS:
            if name in classes:
                if not getattr(module, _MARK, False):
                    module.forward = types.MethodType(forward, module)
                    setattr(module, _MARK, True)
                counts[kind] += 1
    return counts


def disable_fused(model: nn.Module) -> None:
    """Remove what `enable_fused` installed: every module runs its own forward again."""
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
