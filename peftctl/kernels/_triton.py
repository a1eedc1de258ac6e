"""The Triton kernels behind `peftctl.kernels` (imported only where `backend.use_triton` says so).

Each computes in float32 registers and stores in the tensors' own dtype, rounding where the plain
PyTorch formula (which the kernels replace) rounds, so that the two differ by a rounding step at
most. One program per row (RMSNorm, cross-entropy, RoPE) or per block of elements (SwiGLU).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    # y = w * to_x_dtype(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xn).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_bwd(DY, X, W, RSTD, DX, stride_dy, stride_x, stride_dx, n_cols, BLOCK: tl.constexpr):
    # dx = r * (dy w) - r^3 / n * x * sum(dy w x), r = rsqrt(mean(x^2) + eps).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    dxn = dy * w
    c = tl.sum(dxn * x, axis=0)
    dx = rstd * dxn - (rstd * rstd * rstd / n_cols) * c * x
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_fwd(G, U, P, n, BLOCK: tl.constexpr):
    # p = silu(g) * u, silu rounded to the dtype first (as act_fn(gate) * up does).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(P.dtype.element_ty).to(tl.float32)
    tl.store(P + offs, (silu * u).to(P.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd(DP, G, U, n, BLOCK: tl.constexpr):
    # In place: G <- dL/dg = dp * u * s * (1 + g (1 - s)), U <- dL/du = dp * silu(g), s = sigmoid(g).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = dp * (g * s).to(U.dtype.element_ty).to(tl.float32)
    dsilu = (dp * u).to(G.dtype.element_ty).to(tl.float32)
    dg = dsilu * s * (1.0 + g * (1.0 - s))
    tl.store(G + offs, dg.to(G.dtype.element_ty), mask=mask)
    tl.store(U + offs, du.to(U.dtype.element_ty), mask=mask)


@triton.jit
def rope(Q, COS, SIN, OUT, seq_len, n_heads, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs,
         HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    # Forward: o1 = q1 c1 - q2 s1, o2 = q2 c2 + q1 s2 (q * cos + rotate_half(q) * sin, halves 1 and 2
    # of the head dimension); backward: its transpose, dq1 = d1 c1 + d2 s2, dq2 = d2 c2 - d1 s1.
    # One program per token t = b * seq_len + s; q, out: (tokens, heads, head_dim), last dim dense.
    t = tl.program_id(0).to(tl.int64)
    b = t // seq_len
    s = t % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cbase = b * stride_cb + s * stride_cs
    c1 = tl.load(COS + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    h = tl.arange(0, BLOCK_H)  # all heads at once: BLOCK_H >= n_heads
    mask = (h[:, None] < n_heads) & dmask[None, :]
    qp = Q + t * stride_qt + h[:, None] * stride_qh + d[None, :]
    q1 = tl.load(qp, mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = q1 * c1[None, :] + q2 * s2[None, :]
        o2 = q2 * c2[None, :] - q1 * s1[None, :]
    else:
        o1 = q1 * c1[None, :] - q2 * s1[None, :]
        o2 = q2 * c2[None, :] + q1 * s2[None, :]
    op = OUT + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(op, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(op + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy(LOGITS, stride_l, TARGETS, LOSS, ignore_index, n_cols: tl.constexpr, BLOCK: tl.constexpr,
                  WRITE_GRAD: tl.constexpr):
    # n_cols (the vocabulary) is a compile-time constant: one compilation per model, and loop bounds
    # that Triton's interpreter (numpy 2) also takes.
    # Per row: loss = logsumexp(x) - x[target] (0 for an ignored row), in float32; then, in place,
    # x <- softmax(x) - onehot(target) (all zeros for an ignored row): d loss / d logits.
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_l
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    m = float("-inf")
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    lse = m + tl.log(acc)
    safe = tl.where(valid, target, 0)
    picked = tl.load(ptr + safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - picked, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == safe, g - 1.0, g)
            g = tl.where(valid, g, 0.0)
            tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=mask)
