"""SwiGLU's elementwise part, p = silu(g) * u (Shazeer 2020, arXiv 2002.05202), and its backward
written into the inputs' own buffers: the LoRA MLP (`kernels.lora.lora_mlp`) keeps g and u, recomputes
p in its backward, and needs g and u no more once their gradients exist.

Rounding as `act_fn(gate) * up` in transformers: silu(g) is rounded to the dtype before the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftctl.kernels.backend import use_triton

_BLOCK = 1024


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, no autograd. g, u: same shape, dtype and device, contiguous. Returns a new tensor."""
    if use_triton(g):
        from peftctl.kernels import _triton

        p = torch.empty_like(g)
        n = g.numel()
        _triton.swiglu_fwd[(triton_cdiv(n, _BLOCK),)](g, u, p, n, BLOCK=_BLOCK, num_warps=4)
        return p
    return F.silu(g) * u


def swiglu_backward_(dp: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of p = silu(g) * u: (dp * u * silu'(g), dp * silu(g)), written into g and u (which
    are returned). All three contiguous, same shape and dtype; no autograd."""
    if use_triton(g):
        from peftctl.kernels import _triton

        n = g.numel()
        _triton.swiglu_bwd[(triton_cdiv(n, _BLOCK),)](dp, g, u, n, BLOCK=_BLOCK, num_warps=4)
        return g, u
    acc = torch.promote_types(g.dtype, torch.float32)
    gf = g.to(acc)
    s = torch.sigmoid(gf)
    silu = (gf * s).to(g.dtype)
    dsilu = (dp * u).to(acc)
    g.copy_(dsilu * s * (1.0 + gf * (1.0 - s)))
    u.copy_(dp * silu)
    return g, u


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
