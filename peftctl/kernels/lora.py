"""LoRA projections and the LoRA SwiGLU MLP as single autograd functions.

A projection is y = x W^T + b + s (x A^T) B^T (Hu et al. 2021, arXiv 2106.09685, eq. 3, with the
scaling s = alpha / r applied to the r-wide intermediate), W frozen, A (r, in) and B (out, r)
trained. Autograd over the module graph computes it as separate kernels: the base matmul, the
low-rank path into a new output-sized tensor, and their sum; its backward sums the two input
gradients again. Here:

- projections that read the same input (q, k, v; gate, up) take one `x @ [A_1; A_2; ...]^T`, and
  their backward one `dH @ [A_1; ...]` and one `dH^T x` for all their A;
- the low-rank product is added into the base output in place (`addmm_`, alpha = s), and the
  low-rank input gradient into the base input gradient: no output- or input-sized temporaries;
- only x and the r-wide intermediates are kept for the backward (what autograd keeps too);
- the MLP, down(silu(gate(x)) * up(x)), keeps x and the gate and up outputs, and recomputes
  silu(gate) * up in its backward instead of keeping it (down's A needs it; autograd keeps it and
  silu(gate) besides: two intermediate-sized tensors per layer fewer, Unsloth's trade).

Computation in the activations' dtype, adapter weights cast down to it (as `lora.linear.Linear`
does); gradients of A and B are returned in their own dtype (float32). A 4-bit base weight
(bitsandbytes `Params4bit` with its `quant_state`) is dequantized for each product that needs it
and not kept. Base weights and biases take no gradient.

The backward writes into tensors it kept (the MLP's gate and up outputs): the graph cannot be
run backward twice (`retain_graph=True` is refused by the autograd functions' saved-tensor checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from peftctl.kernels.swiglu import swiglu, swiglu_backward_


@dataclass(frozen=True)
class Projection:
    """One linear projection: a frozen base (weight (out, in), or a 4-bit weight with its
    `quant_state`; optional bias) and optionally one adapter (A (r, in), B (out, r), scaling)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    quant_state: Any = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scale: float = 1.0

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant_state is None:
            return self.weight.to(dtype)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight.data, self.quant_state).to(dtype)

    @property
    def adapted(self) -> bool:
        return self.lora_A is not None


def _forward(x2: torch.Tensor, projs: tuple[Projection, ...]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(outputs, H = x2 @ [A...]^T) for 2D x2 (tokens, in)."""
    dtype = x2.dtype
    a = [p.lora_A.to(dtype) for p in projs if p.adapted]
    h = None
    if a:
        h = x2 @ (a[0] if len(a) == 1 else torch.cat(a)).T
    outs, off = [], 0
    for p in projs:
        bias = None if p.bias is None else p.bias.to(dtype)
        y = F.linear(x2, p.base_weight(dtype), bias)
        if p.adapted:
            r = p.lora_A.shape[0]
            y.addmm_(h[:, off : off + r], p.lora_B.to(dtype).T, alpha=p.scale)
            off += r
        outs.append(y)
    return outs, h


def _backward(x2: torch.Tensor, h: torch.Tensor | None, projs: tuple[Projection, ...],
              grads: list[torch.Tensor | None], need_x: bool, dx_out: torch.Tensor | None = None):
    """(dx or None, [dA_i, dB_i per adapted projection]) for _forward's outputs' gradients.
    dx_out: a buffer to write dx into (x2's shape and dtype); read x2 no more after that."""
    dtype = x2.dtype
    dh_parts, adapter_grads, off = [], [], 0
    for p, g in zip(projs, grads, strict=True):
        if not p.adapted:
            continue
        r = p.lora_A.shape[0]
        if g is None:
            dh_parts.append(torch.zeros((x2.shape[0], r), dtype=dtype, device=x2.device))
            adapter_grads.append([None, None])
        else:
            hi = h[:, off : off + r]
            dh_parts.append((g @ p.lora_B.to(dtype)).mul_(p.scale))
            adapter_grads.append([None, (g.T @ hi).mul_(p.scale).to(p.lora_B.dtype)])
        off += r
    dh = None
    if dh_parts:
        dh = dh_parts[0] if len(dh_parts) == 1 else torch.cat(dh_parts, dim=1)
        da = dh.T @ x2  # (R, in), before dx may overwrite x2's buffer
        off = 0
        for pair, part in zip(adapter_grads, dh_parts, strict=True):
            r = part.shape[1]
            pair[0] = da[off : off + r]
            off += r
    dx = None
    if need_x:
        for p, g in zip(projs, grads, strict=True):
            if g is None:
                continue
            w = p.base_weight(dtype)
            if dx is None:
                dx = torch.mm(g, w, out=dx_out) if dx_out is not None else g @ w
            else:
                dx.addmm_(g, w)
        if dx is None:
            dx = torch.zeros_like(x2) if dx_out is None else dx_out.zero_()
        if dh is not None:
            a = [p.lora_A.to(dtype) for p in projs if p.adapted]
            dx.addmm_(dh, a[0] if len(a) == 1 else torch.cat(a))
    out = []
    for p, (da_i, db_i) in zip([p for p in projs if p.adapted], adapter_grads, strict=True):
        out += [None if da_i is None else da_i.to(p.lora_A.dtype), db_i]
    return dx, out


def _adapter_args(projs: tuple[Projection, ...]) -> list[torch.Tensor | None]:
    return [t for p in projs for t in (p.lora_A, p.lora_B)]


def _with_adapters(projs: tuple[Projection, ...], tensors) -> tuple[Projection, ...]:
    # The adapter weights as autograd saw them (the function's inputs), in the same order.
    it = iter(tensors)
    out = []
    for p in projs:
        a, b = next(it), next(it)
        out.append(Projection(p.weight, p.bias, p.quant_state, a, b, p.scale) if p.adapted else p)
    return tuple(out)


def _grad_list(projs, adapter_grads) -> list:
    it = iter(adapter_grads)
    out = []
    for p in projs:
        out += [next(it), next(it)] if p.adapted else [None, None]
    return out


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projs, *adapters):
        x2 = x.reshape(-1, x.shape[-1])
        outs, h = _forward(x2, projs)
        ctx.projs, ctx.lead = projs, x.shape[:-1]
        ctx.save_for_backward(x2, h, *adapters)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, h, *adapters = ctx.saved_tensors
        projs = _with_adapters(ctx.projs, adapters)
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        dx, adapter_grads = _backward(x2, h, projs, g2, ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(*ctx.lead, x2.shape[-1]), None, *_grad_list(projs, adapter_grads))


def project(x: torch.Tensor, projs: tuple[Projection, ...]) -> tuple[torch.Tensor, ...]:
    """Each projection of x: x (..., in) -> one (..., out_i) per projection, in x's dtype."""
    return _Project.apply(x, projs, *_adapter_args(projs))


class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projs, *adapters):
        gate_up, down = projs[:2], projs[2:]
        x2 = x.reshape(-1, x.shape[-1])
        (g, u), h_gu = _forward(x2, gate_up)
        p = swiglu(g, u)
        (y,), h_d = _forward(p, down)
        ctx.projs, ctx.lead = projs, x.shape[:-1]
        ctx.save_for_backward(x2, g, u, h_gu, h_d, *adapters)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, g, u, h_gu, h_d, *adapters = ctx.saved_tensors
        projs = _with_adapters(ctx.projs, adapters)
        gate_up, down = projs[:2], projs[2:]
        dy = grad.reshape(-1, grad.shape[-1])
        p = swiglu(g, u)  # recomputed; its buffer then takes dp
        dp, down_grads = _backward(p, h_d, down, [dy], True, dx_out=p)
        dg, du = swiglu_backward_(dp, g, u)  # into g's and u's buffers
        del dp, p
        dx, gu_grads = _backward(x2, h_gu, gate_up, [dg, du], ctx.needs_input_grad[0])
        grads = _grad_list(gate_up, gu_grads) + _grad_list(down, down_grads)
        return (None if dx is None else dx.view(*ctx.lead, x2.shape[-1]), None, *grads)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): x (..., hidden) -> (..., hidden), in x's dtype. gate and up
    map hidden -> intermediate, down intermediate -> hidden."""
    projs = (gate, up, down)
    return _LoraMLP.apply(x, projs, *_adapter_args(projs))
