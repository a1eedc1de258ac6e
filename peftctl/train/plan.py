"""`peftctl train --dry-run`: resolve everything a run needs, load no weights, say what it would do.

The tokenizer and the data are read (so bad rows fail here as they would in the run), the model is
built on the meta device, and the plan gives the steps, tokens, trainable parameters and a memory
estimate per device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peftctl.errors import InputError

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state in bytes per trainable parameter.
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8,
                    "adafactor": 0.1, "sgd": 4}


def memory_estimate(config, dtype: str, trainable: int, total: int, cfg, micro_tokens: int,
                    loss_fraction: float) -> dict[str, int]:
    """Bytes per device, roughly (within about 30%): weights, adapter training state, activations."""
    bytes_ = _DTYPE_BYTES[dtype]
    hidden = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or 0
    vocab = getattr(config, "vocab_size", 0) or 0
    optim = _OPTIMIZER_BYTES[cfg.optimizer] if cfg.optimizer != "sgd" or cfg.momentum else 0
    # Saved for backward per token and layer (SDPA: no attention matrix), in the model's dtype:
    # about 10 × hidden (norm outputs, q/k/v, rotary, attention output, LoRA inputs) and
    # 6 × intermediate (gate, up, the activation and its input, the down projection's input), plus
    # the float32 inputs of the two RMSNorms. Calibrated on Llama-3.1-8B, LoRA r=16 on all linear
    # layers, batch 4 × 2048 on an H200: 95 GiB estimated, 101 GiB measured (PEFT); with
    # checkpointing, which keeps only each layer's input plus one layer during its recomputation,
    # 29 GiB estimated, 31 GiB measured; Llama-3.2-1B, batch 8 × 2048: 61 GiB estimated, 69 measured.
    per_layer_token = (10 * hidden + 6 * inter) * bytes_ + 2 * 4 * hidden
    if cfg.gradient_checkpointing:
        activations = micro_tokens * (layers * hidden * bytes_ + per_layer_token)
    else:
        activations = micro_tokens * layers * per_layer_token
    # Logits of the loss positions: in the model's dtype, upcast to float32, and their gradient.
    logits = int(micro_tokens * loss_fraction * vocab * (bytes_ + 4 + 4))
    out = {
        "base_weights": (total - trainable) * bytes_,
        "adapter_weights_grads_optimizer": int(trainable * (4 + 4 + optim)),
        "activations": int(activations),
        "logits": logits,
    }
    out["total"] = sum(out.values())
    return out


def plan(recipe, num_processes: int = 1, resume: str | None = None) -> dict[str, Any]:
    from peftctl import data as data_lib
    from peftctl import models
    from peftctl.inspect import inspect_recipe
    from peftctl.train import check_resume_fits, data_hashes, find_resume_checkpoint, resolved, trackers
    from peftctl.train.loop import total_steps
    from peftctl.train.optim import warmup_steps
    from peftctl.ui import Reporter

    cfg = recipe.train
    ckpt = find_resume_checkpoint(resume, Path(recipe.output.dir))
    if ckpt is not None:
        check_resume_fits(ckpt, resolved(recipe).model_dump(mode="json"), data_hashes(recipe.data), Reporter())
    trackers.check_installed(recipe.tracking)
    tokenizer = models.load_tokenizer(recipe.model)
    dataset = data_lib.build(recipe.data, tokenizer, seed=cfg.seed)
    if len(dataset.train) < num_processes:
        raise InputError(f"{len(dataset.train)} training examples cannot feed {num_processes} processes")
    inspected = inspect_recipe(recipe)  # the model on the meta device, with the adapter attached
    config = models.load_config(recipe.model)

    steps = total_steps(cfg, len(dataset.train), num_processes)
    global_batch = cfg.batch_size * cfg.grad_accum * num_processes
    lengths = [len(e.input_ids) for e in dataset.train]
    mean_len = sum(lengths) / len(lengths)
    loss_fraction = sum(e.num_loss_tokens for e in dataset.train) / max(sum(lengths), 1)
    # The longest micro-batch pads every row to its longest example.
    longest = sorted(lengths)[-min(len(lengths), cfg.batch_size):]
    micro_tokens = cfg.batch_size * max(longest)
    memory = memory_estimate(config, inspected["dtype"], inspected["trainable_params"],
                             inspected["total_params"], cfg, micro_tokens, loss_fraction)
    checkpoints = 0 if cfg.save_every is None else math.ceil(steps / cfg.save_every)
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
        "train_examples": len(dataset.train),
        "eval_examples": len(dataset.eval or []),
        "num_processes": num_processes,
        "steps": steps,
        "global_batch": global_batch,
        "epochs": round(steps * global_batch / len(dataset.train), 3),
        "warmup_steps": warmup_steps(cfg, steps),
        "mean_example_tokens": round(mean_len, 1),
        "tokens": int(steps * global_batch * mean_len),  # the expected count, without padding
        "checkpoints": checkpoints,
        "resume_from": str(ckpt) if ckpt else None,
        "memory_estimate_bytes": memory,
        "output_dir": str(Path(recipe.output.dir).resolve()),
    }
