"""A run's speed and memory settings: fused kernels (`train.kernels`) and the memory budget
(`train.memory_budget`), decided the same way for the dry run and the run.

The budget is met from the memory estimate (`peftctl.memory`): the fewest decoder layers
checkpointed that fit (the first ones, whose recompute then comes after every other layer's
backward), and when even all of them do not fit, their kept inputs in pinned host memory
(`kernels.offload`). The estimate counts a little above the measured peak (bench/results), so a
budget it meets is met.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GIB = 2**30


def device_of_this_machine():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def kernels_on(setting: bool | str, device) -> bool:
    """train.kernels: true, false, or auto (on for a CUDA device)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def budget_bytes(setting, device) -> int | None:
    """train.memory_budget in bytes; auto: the device's memory less 5% and 1 GiB (None on a CPU,
    where no budget applies)."""
    if setting is None:
        return None
    if setting == "auto":
        if device.type != "cuda":
            return None
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * 0.95) - GIB
    return int(float(setting) * GIB)


def workload(examples, batch_size: int, pairs: bool = False):
    """The longest micro-batch the data can make (every row padded to the longest example), and
    the share of positions that carry loss. `pairs` (a preference objective): each example is two
    rows, its chosen and its rejected sequence, padded to the longest of either."""
    from peftctl.memory import Workload

    if hasattr(examples, "lengths") or hasattr(examples, "bins"):  # an ExampleSet or a PackedSet
        from peftctl.train.plan import sequence_lengths

        lengths, loss = sequence_lengths(examples)
        longest = int(lengths.max())
        if pairs and hasattr(examples, "tables"):
            rejected = [np.diff(t.arrays["rejected_offsets"]) for t in examples.tables if "rejected_offsets" in t.arrays]
            longest = max([longest, *(int(r.max()) for r in rejected if len(r))])
        return Workload(batch_size * (2 if pairs else 1), longest,
                        float(loss.sum()) / max(int(lengths.sum()), 1))
    lengths = [len(e.input_ids) for e in examples]
    loss_fraction = sum(e.num_loss_tokens for e in examples) / max(sum(lengths), 1)
    return Workload(batch_size, max(lengths), loss_fraction)


def plan(peft_model, config, cfg, work, device) -> dict[str, Any] | None:
    """The memory plan for `cfg` (the recipe's train section) on `device`, or None without a budget."""
    from peftctl import memory

    budget = budget_bytes(cfg.memory_budget, device)
    if budget is None:
        return None
    parts = memory.parts(peft_model, config, workload=work, optimizer=cfg.optimizer, momentum=cfg.momentum,
                         fused=kernels_on(cfg.kernels, device))
    chosen = memory.plan_budget(parts, budget)
    chosen["layers"] = parts.layers
    return chosen


def apply(peft_model, checkpoint_layers: int, offload: bool, device) -> None:
    """Checkpoint the first `checkpoint_layers` decoder layers (none: no checkpointing), their
    inputs offloaded to host memory with `offload`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from peftctl.kernels.offload import OffloadedCheckpoint
    from peftctl.train import enable_gradient_checkpointing

    if checkpoint_layers == 0:
        return
    enable_gradient_checkpointing(peft_model)
    offloader = OffloadedCheckpoint(device) if offload else None
    layers = [m for m in peft_model.get_base_model().modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < checkpoint_layers
        if offloader is not None and i < checkpoint_layers:
            layer._gradient_checkpointing_func = offloader


def describe(chosen: dict[str, Any]) -> str:
    """One line for the log and the dry run."""
    k, n = chosen["checkpoint_layers"], chosen["layers"]
    how = "no layer checkpointed" if k == 0 else f"{k} of {n} layers checkpointed" + (
        ", their inputs in host memory" if chosen["offload"] else "")
    verdict = "fits" if chosen["fits"] else "does NOT fit (the smallest setting is used)"
    return (f"memory budget {chosen['budget'] / GIB:.1f} GiB: {how}; estimated peak "
            f"{chosen['estimate'] / GIB:.1f} GiB {verdict}")
