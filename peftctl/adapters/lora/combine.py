"""`add_weighted_adapter`: a new LoRA adapter combining existing ones, with PEFT's combination
types and results (same inputs, same seed for the random DARE masks, same numbers).

- linear, ties, dare_linear, dare_ties, magnitude_prune: combine the A matrices and the B matrices
  separately, each adapter weighted by sqrt(|weight * scaling|) (the sign on A). Needs equal ranks
  in each layer.
- cat: stack A and B (rank = sum of ranks); exact: the delta is the weighted sum of deltas.
- svd (and ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd): combine the full
  deltas, then keep the top `svd_rank` singular directions (default: the layer's largest rank).

Each layer keeps its own rank: with `rank_pattern` the layers' ranks differ, and the new adapter
records them in its own `rank_pattern` (r is the largest). The new adapter has lora_alpha = r in
every layer (`alpha_pattern` likewise), so its scaling is 1; it starts inactive and frozen.

B's biases (`lora_bias`): adapter i adds scaling_i * b_i to the layer's output, so the new bias is
the combination of the vectors scaling_i * b_i with the same method and weights as the deltas: the
weighted sum sum_i weight_i * scaling_i * b_i for linear, cat and svd (exact: a one-adapter
combination with weight 1 is that adapter), TIES / DARE / magnitude pruning of those vectors for the
others. An adapter without lora_bias contributes zero. Adapters that train the base model's own
biases (`bias`: all or lora_only) cannot be combined: those biases are not a delta that can be
weighted (PEFT refuses them too).
"""

from __future__ import annotations

import math
import re

import torch

from peftctl.adapters import merge_utils as mu
from peftctl.adapters.lora.config import COMBINATION_TYPES, FACTOR_TYPES, SVD_TYPES  # noqa: F401 (re-exported)
from peftctl.adapters.lora.layer import LoraLayer
from peftctl.adapters.modules_to_save import check_combinable_copies, start_from_source_copies


def _merge_tensors(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, sign_method):
    kind = "linear" if kind in ("svd", "cat") else kind.removesuffix("_svd")
    if kind == "linear":
        return mu.task_arithmetic(tensors, weights)
    if kind == "ties":
        return mu.ties(tensors, weights, density, sign_method)
    if kind == "dare_linear":
        return mu.dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return mu.dare_ties(tensors, weights, density, sign_method)
    return mu.magnitude_prune(tensors, weights, density)


def _check(model, adapters: list[str], weights: list[float], combination_type: str, density) -> None:
    model._check_names(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)} (got {combination_type!r})")
    needs_density = combination_type not in ("linear", "cat", "svd")
    if needs_density and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type {combination_type} needs a density between 0 and 1 (got {density!r})")
    configs = [model.peft_config[a] for a in adapters]
    for name, c in zip(adapters, configs, strict=True):
        if c.use_dora:
            raise ValueError(f"adapter {name!r} uses DoRA: its magnitude vector cannot be combined")
        if c.changes_base_weights:
            raise ValueError(f"adapter {name!r} was initialised with {c.init_lora_weights}, which changed the base weights")
        if c.bias != "none":
            raise ValueError(f"adapter {name!r} trains the base model's own biases (bias={c.bias!r}); they are not "
                             "a delta that can be weighted, so it cannot be combined (train it with bias='none')")
    check_combinable_copies(model, adapters)


def _layer_ranks(model, adapters: list[str], combination_type: str, svd_rank: int | None) -> dict[str, int]:
    """{module path: the new adapter's rank there}, each layer from its own adapters' ranks."""
    out = {}
    for name, layer in model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        ranks = {a: layer.r[a] for a in adapters if a in layer.r}
        if not ranks:
            continue
        if combination_type == "cat":
            out[name] = sum(ranks.values())
        elif combination_type in SVD_TYPES:
            out[name] = svd_rank or max(ranks.values())
        elif len(set(ranks.values())) != 1:
            listed = ", ".join(f"{a}: {r}" for a, r in ranks.items())
            raise ValueError(f"combination_type {combination_type} needs adapters of equal rank in each layer "
                             f"({name} has ranks {listed}); use cat or svd")
        else:
            out[name] = next(iter(ranks.values()))
    return out


def _target_modules(model, adapters: list[str]) -> list[str]:
    """Exactly the modules that hold at least one of the adapters."""
    return [name for name, layer in model.model.named_modules()
            if isinstance(layer, LoraLayer) and any(a in layer.r for a in adapters)]


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists")
    if len(adapters) == 1:
        combination_type = "linear"  # one adapter: a plain re-weighting (PEFT's rule)
    _check(model, adapters, weights, combination_type, density)
    ranks = _layer_ranks(model, adapters, combination_type, svd_rank)
    r = max(ranks.values())
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}  # exact paths, as resize_rank writes
    configs = [model.peft_config[a] for a in adapters]
    saved = sorted({m for c in configs for m in c.modules_to_save or []})
    config = configs[0].model_copy(update={
        "r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "lora_bias": any(c.lora_bias for c in configs),
        "target_modules": _target_modules(model, adapters), "layers_to_transform": None, "layers_pattern": None,
        "modules_to_save": saved or None,
    })
    model.inject_adapter(adapter_name, config)
    with torch.no_grad():
        for layer in model.adapter_layers():
            if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                _combine_layer(layer, adapters, weights, adapter_name, combination_type, layer.r[adapter_name],
                               density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
        # A module trained in full by one of the adapters: the new adapter starts from that copy.
        start_from_source_copies(model, adapters, adapter_name)
    model._apply_trainability()


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _combine_layer(layer: LoraLayer, adapters, weights, new, kind, new_rank, density, sign_method,
                   clamp, full_matrices, driver) -> None:
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.r]
    target_a, target_b = _factors(layer, new)
    target_a.zero_()
    target_b.zero_()
    if kind == "cat":
        a = torch.cat([_factors(layer, n)[0] * w * layer.scaling[n] for n, w in present], dim=0)
        b = torch.cat([_factors(layer, n)[1] for n, _ in present], dim=1)
        target_a[: a.shape[0]] = a
        target_b[:, : b.shape[1]] = b
    elif kind in SVD_TYPES:
        # Combined in the base weight's layout (where DARE draws its masks), then out-first.
        deltas = [layer.delta_weight(n) for n, _ in present]
        w = torch.tensor([w for _, w in present], device=deltas[0].device)
        delta = layer.to_out_first(_merge_tensors(kind, deltas, w, density, sign_method)).flatten(1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
        k = min(new_rank, s.shape[0])
        u, vh = u[:, :k] @ torch.diag(s[:k]), vh[:k]
        if clamp is not None:
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        target_a.view(target_a.shape[0], -1)[:k] = vh
        target_b.view(target_b.shape[0], -1)[:, :k] = u
    else:
        scaled = [w * layer.scaling[n] for n, w in present]
        signs = [1.0 if v >= 0 else -1.0 for v in scaled]
        w_a = torch.tensor([math.sqrt(abs(v)) * sg for v, sg in zip(scaled, signs, strict=True)])
        w_b = torch.tensor([math.sqrt(abs(v)) for v in scaled])
        for i, (w, target) in enumerate(((w_a, target_a), (w_b, target_b))):
            tensors = [_factors(layer, n)[i] for n, _ in present]
            target.copy_(_merge_tensors(kind, tensors, w.to(tensors[0].device), density, sign_method))
    _combine_bias(layer, present, new, kind, density, sign_method)


def _combine_bias(layer: LoraLayer, present, new: str, kind: str, density, sign_method) -> None:
    """B's bias of the new adapter: the sources' output biases scaling * b, combined like the deltas
    (the new adapter's scaling is 1)."""
    target = layer.lora_B[new].bias if new in layer.lora_B else None
    if target is None:
        return
    vectors = []
    for n, _ in present:
        b = layer.lora_B[n].bias if n in layer.lora_B else None
        vectors.append(torch.zeros_like(target) if b is None else b * layer.scaling[n])
    w = torch.tensor([w for _, w in present], device=target.device, dtype=target.dtype)
    target.copy_(_merge_tensors(kind, vectors, w, density, sign_method))
