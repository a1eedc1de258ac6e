"""Optimizers and learning-rate schedules, built from the recipe's train section.

Parameter groups: weight decay never touches biases or norm weights, and with LoRA+
(`train.loraplus_lr_ratio`) the B matrices get their own, larger learning rate: LoRA+ (Hayou et
al. 2024, arXiv 2402.12354) shows that one learning rate for A and B makes feature learning
inefficient at large width, and sets B's to lambda times A's (the paper suggests 16 to start).
PEFT's `create_loraplus_optimizer` does the same for lora_B and lora_embedding_B.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_B_MATRICES = (".lora_B.", ".lora_embedding_B.")


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm, LlamaRMSNorm, ...: matched by name, as transformers' own classes are many.
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Trainable parameters in groups of (weight decay?, LoRA+ B matrix?), each with its lr."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}"
            decay = cfg.weight_decay > 0 and pname != "bias" and not _is_norm(module)
            b_matrix = cfg.loraplus_lr_ratio is not None and any(m in f".{full}." for m in _B_MATRICES)
            groups.setdefault((decay, b_matrix), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    out = []
    for (decay, b_matrix), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.loraplus_lr_ratio if b_matrix else 1.0)
        out.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0})
    return out


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    name = cfg.optimizer
    if name == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # As transformers' Trainer sets it up: the recipe's lr, no update scaled by the weight's own
        # size (LoRA's B starts at zero and would never move).
        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    classes = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return classes[name](groups, lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon)


def warmup_steps(cfg, total: int) -> int:
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total)
    return cfg.warmup_steps


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_with_min_lr":
        return min_ratio + (1.0 - min_ratio) * cosine
    return cosine


def build_scheduler(optimizer, cfg, total_steps: int):
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.scheduler, cfg.min_lr_ratio)
    )
