"""Values every room shares, defined once at the bottom of the import layers (imports nothing).

- `VERSION`: peftctl's version (`peftctl.__version__`; recorded in summaries and data-cache keys).
- `IGNORE_INDEX`: the label of a position that carries no loss (-100: transformers' and PyTorch's
  `cross_entropy` default `ignore_index`). Written by the data pipeline, skipped by the loss and
  by `kernels.linear_cross_entropy`.
- `DTYPES`: the floating-point dtypes weights are loaded, trained and saved in, by torch name
  (`getattr(torch, name)`). The recipe adds `auto` (decided by the hardware).
"""

from __future__ import annotations

VERSION = "0.1.0"

IGNORE_INDEX = -100

DTYPES = ("float32", "bfloat16", "float16")
