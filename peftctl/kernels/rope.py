"""Rotary position embedding (Su et al. 2021, arXiv 2104.09864) in one pass, forward and backward.

transformers computes `q * cos + rotate_half(q) * sin`: a concatenation, a negation, two products
and a sum, each a pass over q, and as many again in the backward. Here the output is one pass
over q and the backward one over its gradient (the transpose of the rotation: cos and sin are
constants of the positions). Layout: q is (batch, seq, heads, head_dim), the projection's output
viewed per head before any transpose; cos and sin are (batch or 1, seq, head_dim) as transformers'
rotary embedding returns them.
"""

from __future__ import annotations

import torch

from peftctl.kernels.backend import use_triton


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    batch, seq, heads, dim = q.shape
    half = dim // 2
    if use_triton(q):
        from peftctl.kernels import _triton

        q = q.contiguous()
        cos, sin = cos.expand(-1, seq, -1), sin.expand(-1, seq, -1)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        out = torch.empty_like(q)
        stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
        _triton.rope[(batch * seq,)](q, cos, sin, out, seq, heads, q.stride(1), q.stride(2), out.stride(1),
                                     out.stride(2), stride_cb, cos.stride(1), HALF=half,
                                     BLOCK_D=_next_pow2(half), BLOCK_H=_next_pow2(heads),
                                     BACKWARD=backward, num_warps=4)
        return out
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    q1, q2 = q[..., :half], q[..., half:]
    if backward:
        return torch.cat((q1 * c1 + q2 * s2, q2 * c2 - q1 * s1), dim=-1)
    return torch.cat((q1 * c1 - q2 * s1, q2 * c2 + q1 * s2), dim=-1)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, backward=True), None, None


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q rotated: q * cos + rotate_half(q) * sin. q: (batch, seq, heads, head_dim); cos, sin:
    (batch or 1, seq, head_dim), without gradient, in q's dtype. Returns a new (batch, seq, heads,
    head_dim) tensor, contiguous."""
    return _Rope.apply(q, cos, sin)
