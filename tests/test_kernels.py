"""Fast paths against the plain computation, in float64 and in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftctl.kernels.linear_cross_entropy import linear_cross_entropy_sum


def reference(h, w, t):
    return F.cross_entropy(h @ w.T, t, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("train_weight", [False, True])
def test_linear_cross_entropy_matches_plain_head_float64(train_weight):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_weight)
    t = torch.randint(0, 50, (37,))
    t[::5] = -100
    ours = linear_cross_entropy_sum(h, w, t, chunk_rows=8)  # several chunks, a ragged last one
    gh, *gw = torch.autograd.grad(3.0 * ours, [h, w] if train_weight else [h])
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(train_weight)
    ref = reference(h2, w2, t)
    rh, *rw = torch.autograd.grad(3.0 * ref, [h2, w2] if train_weight else [h2])
    assert torch.allclose(ours, ref, rtol=1e-12)
    assert torch.allclose(gh, rh, rtol=1e-10, atol=1e-12)
    if train_weight:
        assert torch.allclose(gw[0], rw[0], rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_bf16_close_to_float64():
    torch.manual_seed(0)
    h = torch.randn(64, 32)
    w = torch.randn(100, 32) / 4
    t = torch.randint(0, 100, (64,))
    ours = linear_cross_entropy_sum(h.bfloat16().requires_grad_(), w.bfloat16(), t, chunk_rows=16)
    ref = reference(h.double(), w.double(), t)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-2
    assert ours.dtype == torch.float32


def test_no_grad_path_and_all_ignored():
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    t = torch.full((10,), -100)
    with torch.no_grad():
        assert linear_cross_entropy_sum(h, w, t).item() == 0.0
