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
import math
from pathlib import Path
from typing import Any

import numpy as np


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
    from peftctl.inspect import inspect_recipe, meta_model
    from peftctl.memory import Workload
    from peftctl.train import (
        check_data,
        check_model,
        checkpoint,
        data_hashes,
        refuse_in_use,
        resolved,
        resume_point,
        trackers,
    )
    from peftctl.train.loop import examples_in_steps, total_steps
    from peftctl.train.optim import warmup_steps

    cfg = recipe.train
    # As train does, in train's order.
    refuse_in_use(Path(recipe.output.dir))
    hashes = functools.cache(lambda: data_hashes(recipe.data))
    ckpt, _, finished = resume_point(resume, Path(recipe.output.dir), resolved(recipe), hashes)
    hashes()  # the data files found and read before the model (train digests them here)
    trackers.check_installed(recipe.tracking)
    tokenizer = models.load_tokenizer(recipe.model)
    # The model on the meta device, with the adapter attached; then what train checks of it.
    built = meta_model(recipe)
    check_model(recipe, built[0], tokenizer)
    dataset = data_lib.build(recipe.data, tokenizer, seed=cfg.seed, attention=built[0].config._attn_implementation)
    check_data(dataset, num_processes)
    done = checkpoint.read_state(ckpt) if ckpt is not None else checkpoint.TrainState()
    steps = total_steps(cfg, len(dataset.train), num_processes, done.step, done.epoch, done.position)
    global_batch = cfg.batch_size * cfg.grad_accum * num_processes
    lengths, loss_tokens = sequence_lengths(dataset.train)
    mean_len = float(lengths.mean())
    loss_fraction = float(loss_tokens.sum()) / max(int(lengths.sum()), 1)
    # The longest micro-batch pads every row to its longest sequence.
    workload = Workload(cfg.batch_size, int(lengths.max()), loss_fraction)
    inspected = inspect_recipe(recipe, workload, built=built)
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
        # Exact for a fresh run (passes over the data its steps make); a resumed one may change geometry.
        "epochs": round(examples_in_steps(cfg, len(dataset.train), num_processes, steps) / len(dataset.train), 4),
        "warmup_steps": warmup_steps(cfg, steps),
        "mean_example_tokens": round(mean_len, 1),
        "tokens": int(steps * global_batch * mean_len),  # the expected count, without padding
        "checkpoints": checkpoints,
        "resume_from": str(ckpt) if ckpt else None,
        "nothing_to_train": finished,  # a finished run: why `train` would train nothing
        "memory_estimate_bytes": inspected["memory"],
        "output_dir": str(Path(recipe.output.dir).resolve()),
    }
