"""Changing a LoRA adapter's rank after training.

Growing is exact: the new rows of A start random (as at init) and the new columns of B at zero,
so the update B A, and the outputs, stay as they were, and training can use the new rank.
Shrinking keeps the top singular directions of B A (the best rank-r approximation); the relative
error ||B A - B' A'|| / ||B A|| (Frobenius) is reported per module.

The scaling of every module is kept: lora_alpha (and alpha_pattern) change with r so that
alpha / r (or alpha / sqrt(r) with rsLoRA) stays the same, and the saved adapter gives the same
outputs in PEFT.
"""

from __future__ import annotations

import math
import re

import torch

from peftctl.adapters.lora.config import rank_factor
from peftctl.adapters.lora.layer import LoraLayer


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, fan_in) and B (fan_out, r) as matrices."""
    if name in layer.lora_A:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    else:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return a.detach().float().reshape(a.shape[0], -1), b.detach().float().reshape(b.shape[0], -1)


def _truncate(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors of B A, through QR of the thin factors (no full-size SVD)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:r].sqrt()
    total = s.square().sum()
    error = float((s[r:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return (root[:, None] * vh[:r]) @ qa.T, (qb @ u[:, :r]) * root, error


def resize_rank(model, adapter_name: str, r: int) -> dict:
    model._check_names([adapter_name])
    if r < 1:
        raise ValueError(f"the new rank must be >= 1 (got {r})")
    config = model.peft_config[adapter_name]
    if config.changes_base_weights:
        raise ValueError(f"adapter {adapter_name!r} changed the base weights at init ({config.init_lora_weights}); "
                         "its rank cannot be changed")
    rows, alphas = [], {}
    for module_name, layer in model.model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before resizing")
        old_r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        a, b = _factors(layer, adapter_name)
        old_bias = layer.lora_B[adapter_name].bias if adapter_name in layer.lora_B else None
        error = 0.0
        if r < old_r:
            a, b, error = _truncate(a, b, r)
        # New modules of the new rank, initialised as a fresh adapter would be (A random, B zero).
        weight = layer.get_base_layer().weight
        layer.create_weights(adapter_name, r, layer.lora_bias[adapter_name], {"device": weight.device, "dtype": torch.float32})
        layer.r[adapter_name] = r
        layer.reset_weights(adapter_name, True)
        new_a, new_b = _live_factors(layer, adapter_name)
        with torch.no_grad():
            if adapter_name in layer.lora_embedding_A:  # embeddings init the other way round
                new_a.normal_()
                new_b.zero_()
            keep = min(r, old_r)
            new_a.view(r, -1)[:keep] = a[:keep]
            new_b.view(new_b.shape[0], -1)[:, :keep] = b[:, :keep]
            if old_bias is not None:
                layer.lora_B[adapter_name].bias.copy_(old_bias)
        layer.match_mode(adapter_name)  # the new modules take the layer's mode (train / eval)
        alpha = scaling * rank_factor(r, layer.use_rslora[adapter_name])
        layer.lora_alpha[adapter_name] = alpha
        alphas[module_name] = alpha
        rows.append({"module": module_name, "r_from": old_r, "r": r, "relative_error": error})
    default_alpha = config.scaling * rank_factor(r, config.use_rslora)
    model.peft_config[adapter_name] = config.model_copy(update={
        "r": r, "lora_alpha": default_alpha, "rank_pattern": {},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if not math.isclose(a, default_alpha)},
    })
    model._apply_trainability()
    return {
        "adapter": adapter_name,
        "r": r,
        "modules": rows,
        "max_relative_error": max((row["relative_error"] for row in rows), default=0.0),
    }


def _live_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
