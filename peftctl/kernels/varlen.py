"""Causal attention over packed sequences given by their boundaries, without a mask.

Packed training lays a batch's sequences end to end in one row; `cu_seqlens` (int32, (n + 1,)) are
the cumulative lengths, computed on the host when the batch is collated. On a GPU this is PyTorch's
variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), which
costs what attention over the sequences one by one costs, with no (tokens x tokens) mask; elsewhere
(the CPU suite) it is SDPA over each sequence in turn, the same function.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def available(device: torch.device) -> bool:
    """Whether `varlen_attention` runs on this device without a per-sequence loop."""
    return device.type == "cuda" and _torch_varlen() is not None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence. q: (tokens, heads, dim); k, v: (tokens,
    kv_heads, dim) with heads a multiple of kv_heads (grouped-query attention); cu_seqlens: int32
    (n + 1,) on q's device, starting at 0 and ending at tokens; max_len: the longest sequence.
    Returns (tokens, heads, dim) in q's dtype."""
    found = _torch_varlen() if q.is_cuda else None
    if found is not None:
        varlen_attn, params = found
        kwargs = {"scale": scale}
        if "is_causal" in params:  # torch 2.10-2.11
            kwargs["is_causal"] = True
        else:  # torch >= 2.12: a (left, right) window; (-1, 0) is causal
            kwargs["window_size"] = (-1, 0)
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)
    return per_sequence(q, k, v, cu_seqlens, scale)


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """The same function as SDPA over one sequence at a time (the reference, and the CPU path)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out
