"""RMSNorm that keeps for its backward only its input (in its own dtype) and one float32 per row.

y = w * to_dtype(x * rsqrt(mean(x^2) + eps)) (Zhang & Sennrich 2019, arXiv 1910.07467; the rounding
as transformers' LlamaRMSNorm does it). Autograd through transformers' formula keeps a float32 copy
of the input (4 bytes per element, twice the input in bf16); this function keeps the input itself
and the reciprocal root per row, and recomputes the rest in the backward:
dx = r (dy w) - r^3 / n * x * sum(dy w x), r = rsqrt(mean(x^2) + eps).

The weight is taken as frozen (no gradient): LoRA trains adapters, not norms. A norm whose weight
trains keeps transformers' own forward (see `adapters.lora.fused`).
"""

from __future__ import annotations

import torch

from peftctl.kernels.backend import use_triton


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 input


def _forward_plain(x2, weight, eps):
    xf = x2.to(_acc(x2.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = weight * (xf * rstd[:, None]).to(x2.dtype)
    return y, rstd


def _backward_plain(dy, x2, weight, rstd):
    acc = _acc(x2.dtype)
    xf = x2.to(acc)
    dxn = dy.to(acc) * weight.to(acc)
    c = (dxn * xf).sum(-1, keepdim=True)
    r = rstd[:, None]
    return (r * dxn - (r * r * r / x2.shape[-1]) * c * xf).to(x2.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if use_triton(x2) and x2.dtype != torch.float64:
            from peftctl.kernels import _triton

            x2 = x2.contiguous()
            y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            # (float64 input takes the plain path: the kernel computes in float32)
            block = _next_pow2(shape[-1])
            _triton.rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), shape[-1], eps,
                                                 BLOCK=block, num_warps=min(16, max(1, block // 256)))
        else:
            y, rstd = _forward_plain(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape)
        if use_triton(x2) and x2.dtype != torch.float64:
            from peftctl.kernels import _triton

            dy2 = dy2.contiguous()
            dx = torch.empty_like(x2)
            block = _next_pow2(x2.shape[-1])
            _triton.rms_norm_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, dy2.stride(0), x2.stride(0), dx.stride(0),
                                                 x2.shape[-1], BLOCK=block, num_warps=min(16, max(1, block // 256)))
        else:
            dx = _backward_plain(dy2, x2, weight, rstd)
        return dx.view(ctx.shape), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. x: (..., n) float; weight: (n,) without gradient.
    Returns (..., n) in promote(x.dtype, weight.dtype), as transformers' formula does."""
    return _RMSNorm.apply(x, weight, eps)
