"""`peftctl train --dry-run`: resolve everything a run needs, load no weights, say what it would do.

It makes the checks `train` makes before its first step, in the same order and with the same
messages (the same functions, `train.check_model` and `train.check_data` among them), with the
model built on the meta device instead of loaded: what `train` would refuse before it writes
anything, the dry run refuses alike. The tokenizer and the data are read (so bad rows fail here as
they would in the run), and the plan gives the steps, tokens, trainable parameters and a memory
estimate per device (`peftctl.memory`, for the longest micro-batch the data can make).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from peftctl import memory
from peftctl.errors import InputError


def sequence_lengths(train) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss tokens of each sequence the loop batches: an example, or a packed row of
    several (read from the tables' per-example counts, without building the sequences)."""
    from peftctl.data.packing import PackedSet

    if isinstance(train, PackedSet):
        lengths, loss = train.examples.lengths(), train.examples.loss_counts()
        return (np.array([lengths[b].sum() for b in train.bins], dtype=np.int64),
                np.array([loss[b].sum() for b in train.bins], dtype=np.int64))
    return train.lengths(), train.loss_counts()


def plan(recipe, num_processes: int = 1, resume: str | None = None) -> dict[str, Any]:
    from peftctl import data as data_lib
    from peftctl import models
    from peftctl.train import (
        budget,
        check_data,
        check_model,
        checkpoint,
        data_hashes,
        refuse_in_use,
        resolved,
        resume_point,
        trackers,
        with_labels,
    )
    from peftctl.train.loop import examples_in_steps, total_steps
    from peftctl.train.optim import warmup_steps

    cfg = recipe.train
    # As train does, in train's order.
    refuse_in_use(Path(recipe.output.dir))
    recipe = with_labels(recipe)
    hashes = functools.cache(lambda: data_hashes(recipe.data))
    ckpt, changes, finished = resume_point(resume, Path(recipe.output.dir), resolved(recipe), hashes)
    hashes()  # the data files found and read before the model (train digests them here)
    trackers.check_installed(recipe.tracking)
    tokenizer = models.load_tokenizer(recipe.model)
    # The model on the meta device, with the adapter attached; then what train checks of it.
    built = meta_model(recipe)
    check_model(recipe, built[0], tokenizer)
    dataset = data_lib.build(recipe.data, tokenizer, seed=cfg.seed, attention=built[0].config._attn_implementation,
                             task=recipe.model.task_name, labels=recipe.model.labels)
    check_data(dataset, num_processes)
    done = checkpoint.read_state(ckpt) if ckpt is not None else checkpoint.TrainState()
    steps = total_steps(cfg, len(dataset.train), num_processes, done.step, done.epoch, done.position)
    global_batch = cfg.batch_size * cfg.grad_accum * num_processes
    lengths, _ = sequence_lengths(dataset.train)
    mean_len = float(lengths.mean())
    # The longest micro-batch pads every row to its longest sequence.
    workload = budget.workload(dataset.train, cfg.batch_size, pairs=cfg.objective != "sft")
    inspected = inspect_recipe(recipe, workload, built=built)
    # The periodic checkpoints this invocation writes (train.loop: every save_every steps and at the
    # last step), from the step it starts at.
    checkpoints = 0 if cfg.save_every is None or steps <= done.step else (
        steps // cfg.save_every - done.step // cfg.save_every + (steps % cfg.save_every != 0))
    keep_best = cfg.save_every is not None or cfg.load_best_at_end or cfg.early_stopping_patience is not None
    return {
        "dry_run": True,
        "model": recipe.model.name_or_path,
        "model_type": inspected["model_type"],
        "dtype": inspected["dtype"],
        "method": recipe.adapter.method,
        "trainable_params": inspected["trainable_params"],
        "total_params": inspected["total_params"],
        "trainable_percent": inspected["trainable_percent"],
        "adapted_modules": len(inspected["modules"]),
        # Prompt-learning methods adapt no module: their virtual tokens instead (None for the others).
        "virtual_tokens": recipe.adapter.num_virtual_tokens if recipe.adapter.is_prompt_learning else None,
        "train_examples": len(dataset.train),
        "eval_examples": len(dataset.eval or []),
        "num_processes": num_processes,
        "steps": steps,
        "global_batch": global_batch,
        # Exact for a fresh run (passes over the data its steps make); a resumed one may change geometry.
        "epochs": round(examples_in_steps(cfg, len(dataset.train), num_processes, steps) / len(dataset.train), 4),
        "warmup_steps": warmup_steps(cfg, steps),
        "mean_example_tokens": round(mean_len, 1),
        "tokens": int(steps * global_batch * mean_len),  # the expected count, without padding
        "checkpoints": checkpoints,
        "checkpoints_kept": checkpoints if cfg.keep_checkpoints is None else min(checkpoints, cfg.keep_checkpoints),
        # and one at each evaluation that improves on the best eval loss (not counted: data-dependent)
        "checkpoints_at_best_eval": bool(keep_best and len(dataset.eval or [])),
        "resume_from": str(ckpt) if ckpt else None,
        "resume_changes": changes,  # what the real run logs as "resuming from ... with recipe changes"
        "nothing_to_train": finished,  # a finished run: why `train` would train nothing
        "memory_estimate_bytes": inspected["memory"],
        "memory_plan": inspected["memory"]["memory_plan"],
        "kernels": budget.kernels_on(cfg.kernels, budget.device_of_this_machine()),
        "output_dir": str(Path(recipe.output.dir).resolve()),
    }


def meta_model(recipe):
    """(the PeftModel a run of `recipe` trains, built on the meta device (`models.meta_model`);
    the model config; dtype). An adapter that does not fit the model is an input error."""
    from peftctl import models
    from peftctl.adapters import TaskType, attach
    from peftctl.sections import TASK_TYPES

    model, config, dtype = models.meta_model(recipe.model)
    adapter = recipe.adapter.model_copy(update={"task_type": TaskType(TASK_TYPES[recipe.model.task_name]).value})
    try:
        return attach(model, adapter), config, dtype
    except (ValueError, TypeError) as e:
        raise InputError(f"adapter: {(str(e).splitlines() or [''])[0]}") from None  # torch adds C++ frames


def inspect_recipe(recipe, workload=None, built=None) -> dict[str, Any]:
    """Which modules the recipe adapts and the parameter counts; with a `memory.Workload`, the
    peak-memory estimate for it (`peftctl inspect --memory`: the recipe's batch_size × max_length).
    `built`: what `meta_model(recipe)` returned, when the caller has it already."""
    from peftctl.adapters.io import wrappers
    from peftctl.adapters.layer import AdapterLayer

    peft_model, config, dtype = built if built is not None else meta_model(recipe)
    rows = []
    for name, module in wrappers(peft_model.base_model.model):
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module.original_module
        weight = getattr(base, "weight", None)
        rows.append({
            "module": name,
            "type": type(base).__name__ + ("" if isinstance(module, AdapterLayer) else " (trained in full)"),
            "shape": [base.out_features, base.in_features] if _quantized(base) else
            (list(weight.shape) if weight is not None else None),
            "rank": dict(getattr(module, "r", {})),  # LoRA's (and VeRA's) ranks by adapter
            # A few words per adapter: "r=8" (LoRA), "scales input" (IA3); empty for a module trained in full.
            "adapter": {n: module.describe(n) for n in module.adapter_names} if isinstance(module, AdapterLayer) else {},
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        })
    trainable, total = peft_model.get_nb_trainable_parameters()
    result = {
        "model": recipe.model.name_or_path,
        "model_type": getattr(config, "model_type", None),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": recipe.model.quantization.model_dump() if recipe.model.quantization else None,
        "method": recipe.adapter.method,
        "modules": rows,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
    }
    if workload is not None:
        from peftctl.train import budget

        # As the run on this machine would train: fused kernels per train.kernels, checkpointing
        # per train.memory_budget (its plan) or train.gradient_checkpointing.
        device = budget.device_of_this_machine()
        cfg = recipe.train
        chosen = budget.plan(peft_model, config, cfg, workload, device) if cfg.memory_budget is not None else None
        result["memory"] = memory.estimate(
            peft_model, config, workload=workload, gradient_checkpointing=recipe.uses_gradient_checkpointing(),
            optimizer=cfg.optimizer, momentum=cfg.momentum, fused=budget.kernels_on(cfg.kernels, device),
            checkpoint_layers=None if chosen is None else chosen["checkpoint_layers"],
            offload=chosen is not None and chosen["offload"],
        )
        result["memory"]["memory_plan"] = chosen
        result["memory"]["workload"] = {"batch": workload.batch, "seq_len": workload.seq_len,
                                        "loss_fraction": workload.loss_fraction}
    return result


def _quantized(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")
