"""Cross-entropy of a linear output head without materialising the logits.

`linear_cross_entropy_sum(hidden, weight, targets)` equals
`F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")` but walks the
tokens in chunks: each chunk's logits (chunk x vocabulary) live only while its loss and its
gradient with respect to `hidden` (and `weight`, when that trains) are computed, in the forward
pass (so the backward only scales the kept gradients by the incoming one). For a 128k vocabulary
and 16k tokens this replaces about 12 GiB of logits, their float32 copy and their gradient by one
chunk of 512 MiB; the matrix products are the same ones the plain head and its backward do.

Per chunk, the softmax and its gradient are one Triton kernel on a GPU (`_triton.cross_entropy`:
log-sum-exp in float32 over the logits in their own dtype, which it overwrites with softmax -
one-hot), plain PyTorch elsewhere (float32 logits, several passes), as Liger-Kernel's fused linear
cross-entropy does.
"""

from __future__ import annotations

import torch

from peftctl.constants import IGNORE_INDEX as IGNORE
from peftctl.kernels.backend import use_triton


def default_chunk_rows(vocab: int, budget_bytes: int = 512 * 2**20, bytes_per_logit: int = 8) -> int:
    """Tokens per chunk for a `vocab`-wide head, kept within `budget_bytes` (at least 16 rows).
    Plain PyTorch: float32 logits plus their softmax/gradient in place take about 8 bytes per (row,
    vocabulary entry), the default; the fused kernel keeps the logits in their own dtype,
    overwritten by their gradient (`bytes_per_logit` 2 in bf16). `memory.estimate` counts the plain
    chunk (the larger of the two)."""
    return max(16, budget_bytes // (bytes_per_logit * vocab))


def _fused_rows(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> torch.Tensor:
    """Per-row float32 losses of a (rows, vocab) logits chunk; with write_grad the chunk is
    overwritten by d loss / d logits (softmax - one_hot, zero on ignored rows) in its own dtype."""
    from peftctl.kernels import _triton

    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _triton.cross_entropy[(logits.shape[0],)](logits, logits.stride(0), targets, losses, IGNORE, n_cols=logits.shape[1],
                                              BLOCK=4096, WRITE_GRAD=write_grad, num_warps=8)
    return losses


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        need_h = hidden.requires_grad
        need_w = weight.requires_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least float32, float64 stays
        fused = use_triton(hidden) and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            if fused:
                # One kernel: the rows' losses, and the logits overwritten by their gradient.
                grad = h @ weight.T
                total += _fused_rows(grad, t, need_h or need_w).sum()
            else:
                valid = t != IGNORE
                logits = (h @ weight.T).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                safe_t = torch.where(valid, t, 0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if need_h or need_w:
                    # d loss / d logits = softmax - one_hot, zero on ignored rows; reuse the buffer.
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                    grad.mul_(valid[:, None])
                    grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[start : start + chunk_rows] = grad @ weight
            if need_w:
                grad_w += (grad.T @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of `hidden @ weight.T` against `targets` (IGNORE_INDEX, -100:
    ignored): sum_i [logsumexp(h_i W^T) - (h_i W^T)[t_i]], as `F.cross_entropy(hidden @ weight.T,
    targets, reduction="sum")` computes it.

    hidden: (N, H) (or (..., H), flattened); weight: (V, H); targets: (N,) integer ids. Returns a
    scalar in float32 (float64 for float64 input). chunk_rows tokens at a time (default
    `default_chunk_rows(V)`): each chunk's logits are multiplied in the inputs' dtype, then
    reduced in float32 (or float64); on a GPU by the Triton kernel, which overwrites the chunk's
    logits with their gradient in their own dtype. The gradients with respect to `hidden` and `weight` (those
    that require grad) are computed in the forward, chunk by chunk ((softmax - one_hot) times W, or
    its transpose times h), and kept: the backward only scales them by the incoming gradient. So a
    call on tensors that require grad costs the plain head's forward and backward even when no
    backward follows. Target ids must lie in [0, V) or be IGNORE_INDEX.
    """
    if hidden.dim() != 2 or targets.dim() != 1:
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    rows = chunk_rows or default_chunk_rows(weight.shape[0], bytes_per_logit=2 if half and use_triton(hidden) else 8)
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows)


class _LinearCrossEntropyRows(torch.autograd.Function):
    """Per-row losses: the forward keeps d loss_i / d hidden_i (one row each); the backward scales
    row i by the incoming gradient's entry i. The head's weight gradient depends on those entries,
    so when the weight trains it is recomputed chunk by chunk in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        need_h = hidden.requires_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)
        fused = use_triton(hidden) and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
        losses = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            if fused:
                grad = h @ weight.T
                losses[start : start + chunk_rows] = _fused_rows(grad, t, need_h)
            else:
                grad = _plain_rows(h, weight, t, acc, losses[start : start + chunk_rows], need_h)
            if need_h:
                grad_h[start : start + chunk_rows] = grad @ weight
        ctx.save_for_backward(grad_h, hidden if weight.requires_grad else None, weight, targets)
        ctx.chunk_rows, ctx.acc = chunk_rows, acc
        return losses

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, hidden, weight, targets = ctx.saved_tensors
        gh = grad_h * grad_out[:, None].to(grad_h.dtype) if grad_h is not None else None
        gw = None
        if hidden is not None:  # the head trains: sum_i g_i (softmax_i - onehot_i)^T h_i, recomputed
            gw = torch.zeros(weight.shape, dtype=ctx.acc, device=weight.device)
            scratch = torch.empty(min(ctx.chunk_rows, hidden.shape[0]), dtype=ctx.acc, device=hidden.device)
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                h = hidden[start : start + ctx.chunk_rows]
                grad = _plain_rows(h, weight, targets[start : start + ctx.chunk_rows], ctx.acc,
                                   scratch[: len(h)], True)
                grad = grad * grad_out[start : start + ctx.chunk_rows, None].to(grad.dtype)
                gw += (grad.T @ h).to(ctx.acc)
            gw = gw.to(weight.dtype)
        return gh, gw, None, None


def _plain_rows(h, weight, t, acc, out, need_grad):
    """Plain PyTorch: the chunk's per-row losses written into `out`; returns d loss / d logits
    (softmax - one_hot, zero on ignored rows) in h's dtype when `need_grad`."""
    valid = t != IGNORE
    logits = (h @ weight.T).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    safe_t = torch.where(valid, t, 0)
    picked = logits.gather(1, safe_t[:, None]).squeeze(1)
    out.copy_(torch.where(valid, lse - picked, 0.0))
    if not need_grad:
        return None
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
    grad.mul_(valid[:, None])
    return grad.to(h.dtype)


def linear_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_rows: int | None = None) -> torch.Tensor:
    """Per-row cross-entropies of `hidden @ weight.T` against `targets`: a (N,) float32 (float64
    for float64 input) tensor, 0 where the target is IGNORE_INDEX; the same arithmetic as
    `linear_cross_entropy_sum` (whose sum it is), for losses that weigh rows differently (the
    preference objectives sum them per sequence). hidden: (N, H); weight: (V, H); targets: (N,).
    The logits are never materialised beyond one chunk; the gradient with respect to `hidden` is
    computed in the forward (one (N, H) buffer) and scaled per row in the backward."""
    if hidden.dim() != 2 or targets.dim() != 1:
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    rows = chunk_rows or default_chunk_rows(weight.shape[0], bytes_per_logit=2 if half and use_triton(hidden) else 8)
    return _LinearCrossEntropyRows.apply(hidden, weight, targets, rows)
