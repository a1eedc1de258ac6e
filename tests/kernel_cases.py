"""The Triton kernels against their plain-PyTorch versions, on whatever device is given.

Used twice: on the CPU under Triton's interpreter (tests/test_fused.py runs this file in a child
process with TRITON_INTERPRET=1, which must be set before Triton is imported), and on a GPU
(tests/test_fused_gpu.py imports `run`). `run(device)` returns one (name, dtype, error, bound) row
per comparison: error is ||fast - plain|| / ||plain|| (Frobenius, or the relative difference of a
scalar loss). Bounds, derived from the arithmetic:

- float32: both sides compute in float32 in another order: a few units of 2^-24 per element; 1e-5.
- bfloat16: each side rounds its outputs (and the intermediates the plain formula rounds, which the
  kernels round at the same points) to bfloat16 with 8 bits of mantissa: round-to-nearest gives at
  most 2^-9 relative per rounding, and the two sides' roundings can fall on opposite sides, so a
  value rounded twice differs by up to 2 * 2^-8 of its magnitude; Triton's interpreter (numpy)
  truncates instead of rounding, doubling that. 1.6e-2 (= 4 * 2^-8) covers both.
- the cross-entropy's loss is accumulated in float32 on both sides from the same bf16 logits: 1e-5.
"""

from __future__ import annotations

import os
import sys

import torch

BOUND = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _both(fn):
    """fn() with the plain path, then with the Triton kernels (PEFTCTL_TRITON=0, then unset or interpret)."""
    mode = os.environ.get("PEFTCTL_TRITON")
    try:
        os.environ["PEFTCTL_TRITON"] = "0"
        plain = fn()
        if mode is None:
            os.environ.pop("PEFTCTL_TRITON")
        else:
            os.environ["PEFTCTL_TRITON"] = mode
        fast = fn()
    finally:
        if mode is None:
            os.environ.pop("PEFTCTL_TRITON", None)
        else:
            os.environ["PEFTCTL_TRITON"] = mode
    return plain, fast


def run(device: str) -> list[tuple[str, str, float, float]]:
    from peftctl.kernels import linear_cross_entropy as lce
    from peftctl.kernels import norm, rope, swiglu

    rows = []
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        bound = BOUND[dtype]
        # RMSNorm over a width that is not a power of two (masked lanes), forward and backward.
        x = randn(6, 3, 48, dtype=dtype)
        w = (1 + 0.1 * randn(48, dtype=torch.float32)).to(dtype)
        dy = randn(6, 3, 48, dtype=dtype)

        def rms(x=x, w=w, dy=dy):
            xr = x.clone().requires_grad_()
            y = norm.rms_norm(xr, w, 1e-6)
            y.backward(dy)
            return y.detach(), xr.grad

        (y0, g0), (y1, g1) = _both(rms)
        rows += [("rms_norm forward", name, _rel(y1, y0), bound), ("rms_norm backward", name, _rel(g1, g0), bound)]

        # SwiGLU over a length that is not a multiple of the block.
        g, u, dp = (randn(7, 300, dtype=dtype) for _ in range(3))

        def glu(g=g, u=u, dp=dp):
            p = swiglu.swiglu(g, u)
            dg, du = swiglu.swiglu_backward_(dp, g.clone(), u.clone())
            return p, dg, du

        (p0, dg0, du0), (p1, dg1, du1) = _both(glu)
        rows += [("swiglu forward", name, _rel(p1, p0), bound), ("swiglu backward (gate)", name, _rel(dg1, dg0), bound),
                 ("swiglu backward (up)", name, _rel(du1, du0), bound)]

        # RoPE with cos/sin per batch row and broadcast over the batch; 3 heads (masked head lanes).
        for cos_batch in (1, 2):
            q = randn(2, 5, 3, 8, dtype=dtype)
            cos, sin = randn(cos_batch, 5, 8, dtype=dtype), randn(cos_batch, 5, 8, dtype=dtype)
            dout = randn(2, 5, 3, 8, dtype=dtype)

            def rot(q=q, cos=cos, sin=sin, dout=dout):
                qr = q.clone().requires_grad_()
                o = rope.apply_rope(qr, cos, sin)
                o.backward(dout)
                return o.detach(), qr.grad

            (o0, q0), (o1, q1) = _both(rot)
            rows += [(f"rope forward (cos batch {cos_batch})", name, _rel(o1, o0), bound),
                     (f"rope backward (cos batch {cos_batch})", name, _rel(q1, q0), bound)]

        # Linear cross-entropy: several chunks, a ragged last one, ignored rows.
        h = randn(37, 16, dtype=dtype)
        weight = randn(50, 16, dtype=dtype) / 4
        t = torch.randint(0, 50, (37,), generator=gen).to(device)
        t[::5] = -100

        def ce(h=h, weight=weight, t=t):
            hr = h.clone().requires_grad_()
            loss = lce.linear_cross_entropy_sum(hr, weight, t, chunk_rows=8)
            loss.backward()
            return loss.detach(), hr.grad

        (l0, gh0), (l1, gh1) = _both(ce)
        rows += [("cross-entropy loss", name, abs(float(l1) - float(l0)) / abs(float(l0)), 1e-5),
                 ("cross-entropy gradient", name, _rel(gh1, gh0), bound)]
    return rows


def report(rows) -> bool:
    ok = True
    for what, dtype, err, bound in rows:
        good = err <= bound
        ok &= good
        print(f"{what:34} {dtype:9} {err:.2e} (bound {bound:.1e}){'' if good else '  <-- FAIL'}")
    return ok


if __name__ == "__main__":  # python tests/kernel_cases.py (with TRITON_INTERPRET=1 on a CPU)
    sys.exit(0 if report(run(sys.argv[1] if len(sys.argv) > 1 else "cpu")) else 1)
