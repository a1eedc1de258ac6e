"""Ways to combine task tensors (adapter weights or weight deltas): task arithmetic, TIES, DARE and
magnitude pruning, with PEFT's definitions (so the same inputs and seed give the same result).

- Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): sum_i w_i t_i.
- TIES (Yadav et al. 2023, arXiv 2306.01708, section 3, algorithm 1): trim each t_i to its top
  `density` fraction by magnitude, elect a sign per entry (of the sum: "total", or of the sign count:
  "frequency"), and average, per entry, the weighted values that agree with it ("disjoint merge").
- DARE (Yu et al. 2024, arXiv 2311.03099, "Drop And REscale"): drop each entry with probability 1 - density
  and rescale the rest by 1 / density, so each t_i is kept in expectation; then a weighted sum
  (`dare_linear`) or TIES' sign election and disjoint merge (`dare_ties`). Draws from torch's
  global generator: seed it for repeatable masks.

Each function takes a list of same-shaped tensors and a 1-D tensor of weights, one per tensor, and
returns one tensor of that shape (float tensors; the dtype of the inputs). ValueError for an
unknown sign method.
"""

from __future__ import annotations

import torch


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def majority_sign_mask(t: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Entries (stacked on dim 0) whose sign agrees with the elected sign of their position."""
    if method == "total":
        magnitude = t.sum(dim=0)
    elif method == "frequency":
        magnitude = t.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be total or frequency (got {method!r})")
    return t.sign() == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([magnitude_prune_tensor(t, density) for t in tensors], weights)


def ties(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, method: str = "total") -> torch.Tensor:
    stacked = torch.stack([magnitude_prune_tensor(t, density) for t in tensors])
    return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, method))


def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([random_prune_tensor(t, density) for t in tensors], weights)


def dare_ties(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, method: str = "total") -> torch.Tensor:
    stacked = torch.stack([random_prune_tensor(t, density) for t in tensors])
    return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, method))
