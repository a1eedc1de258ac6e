"""Which implementation a fast path takes: a Triton kernel on a CUDA tensor, plain PyTorch elsewhere.

Every function in `peftctl.kernels` has both; the plain one is the reference the CPU suite checks
and the fallback wherever Triton is missing. `PEFTCTL_TRITON` overrides the choice:

- unset (default): Triton for CUDA tensors when the `triton` package imports, else plain PyTorch;
- `0`: plain PyTorch everywhere (to compare the two on a GPU, or to rule a kernel out);
- `interpret`: Triton everywhere, CPU tensors included. Only meaningful with `TRITON_INTERPRET=1`
  set before Triton is imported (Triton's interpreter then runs the kernels with numpy): this is
  how the CPU suite checks the kernels' arithmetic (tests/test_fused.py).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel over `t` runs as Triton (see the module docstring)."""
    mode = os.environ.get("PEFTCTL_TRITON", "")
    if mode == "0":
        return False
    if mode == "interpret":
        return triton_importable()
    return t.is_cuda and triton_importable()
