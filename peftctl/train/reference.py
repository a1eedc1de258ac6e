"""The precomputed reference log-probabilities of dpo and ipo (`train.precompute_ref_log_probs`).

Each split (train, eval) is computed once and kept in the data cache (`data.cache_dir`, else
$PEFTCTL_CACHE/data) as `reference/KEY.safetensors`: a (N, 2) float32 tensor `logps` (each pair's
chosen and rejected sums). KEY (`data.cache.cache_key`) covers everything the numbers depend on:

- the examples, in order: the tokenized tables' own cache keys (source content, tokenizer,
  template, format options, max_length, truncation) and which rows of them the split takes
  (eval_split, the seed, source weights);
- the model: the recipe's `model` section (name or path, revision, dtype, quantization, attention
  implementation, ...), its files as they are now (each file's name, size and modification time,
  as the converted-GGUF cache keys a model file; a hub model's commit), and the numerics around it
  (device type and GPU name, torch and transformers versions, the fused kernels, eval.batch_size,
  which decides the padding of each batch);
- with `train.init_adapter`: the adapter section and a digest of the loaded adapter's weights (the
  reference is then the model with that adapter; without one the adapter is off, so its weights do
  not matter).

A change in any recomputes; a split whose key is unchanged is read back (the console says so).
With several processes each computes every world-th batch of the one-process order and the shares
are summed (each pair is computed by exactly one process, the others contribute 0, so the sum is
exact and every process ends with the same tensor, made of the batches one process makes: the
same numbers, up to a matmul's rounding under another thread count); the main process alone
reads and writes the cache and hands what it read to the others. `data.cache: false`: no cache.
The pass runs where the model is (the host under FSDP, before sharding). `peftctl eval` of a run
from `train.init_adapter` reads and writes the same entries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from peftctl.ui import Reporter

CACHE_FOLDER = "reference"


def examples_digest(examples) -> str:
    """What an `ExampleSet` holds, in order: its tables' cache keys and the rows it takes of them."""
    import numpy as np

    h = hashlib.sha256(json.dumps([t.meta.get("key") for t in examples.tables]).encode())
    h.update(np.ascontiguousarray(examples.table, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(examples.which, dtype=np.int64).tobytes())
    return h.hexdigest()


def pairs_digest(examples) -> str:
    """sha256 of the pairs themselves (each sequence's token ids and labels, in order): what a
    run's saved reference log-probabilities were computed on (`run_metadata`)."""
    h = hashlib.sha256()
    for ex in examples:
        for seq in (ex, ex.rejected):
            h.update(json.dumps([list(map(int, seq.input_ids)), list(map(int, seq.labels))]).encode())
    return h.hexdigest()


def run_metadata(recipe, model, splits: dict) -> dict[str, str]:
    """What the run folder's reference_logps.safetensors records beside the numbers: each split's
    `pairs_digest` and, with train.init_adapter, the digest of that adapter's weights (the
    reference model), so that `peftctl eval` can tell whether they still apply."""
    out = {f"{name}_pairs": pairs_digest(examples) for name, examples in splits.items()}
    if recipe.train.init_adapter is not None:
        out["init_adapter_weights"] = adapter_digest(model)
    return out


def model_files(spec, model) -> dict[str, Any]:
    """The model's files as they are now: (name, size, mtime_ns) of every file of its folder (a
    file replaced is a new model), or of its GGUF file; a hub model's id, revision and commit."""
    from peftctl import models

    source = models.resolve(spec.name_or_path, spec.cache_dir, convert=False)
    config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
    out: dict[str, Any] = {"kind": source.kind, "commit": getattr(config, "_commit_hash", None)}
    if source.kind == "folder":
        files = sorted(p for p in Path(source.path).iterdir() if p.is_file())
    elif source.kind == "gguf":
        files = [Path(source.path) / str(source.gguf_file)]
    else:
        files = []
        out["hub"] = [source.path, spec.revision]
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    out["files"] = stats
    return out


def adapter_digest(peft_model) -> str:
    """sha256 of the adapter's saved tensors (names, dtypes, shapes, bytes) as they are in memory."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(peft_model.adapter_tensors_to_save("default").items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(recipe, model, examples, device, kernels: Any = None) -> str:
    """The cache key of one split's reference log-probabilities (see the module's docstring)."""
    import torch
    import transformers

    from peftctl.data import cache

    init = recipe.train.init_adapter
    return cache.cache_key({
        "what": "reference_logps",
        "examples": examples_digest(examples),
        "model": recipe.model.model_dump(mode="json"),
        "model_files": model_files(recipe.model, model),
        "adapter": None if init is None else {"section": recipe.adapter.model_dump(mode="json"),
                                              "weights": adapter_digest(model)},
        "batch_size": recipe.eval.batch_size,
        "kernels": kernels,
        "device": [device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else None],
        "torch": torch.__version__, "transformers": transformers.__version__,
    })


def cache_folder(data_cfg) -> Path | None:
    """Where the reference log-probabilities are kept, or None when the data cache is off."""
    from peftctl.data import cache

    if not data_cfg.cache:
        return None
    return (Path(data_cfg.cache_dir) if data_cfg.cache_dir else cache.default_dir()) / CACHE_FOLDER


def read_cached(path: Path, pairs: int):
    """The cached (pairs, 2) float32 tensor at `path`, or None (missing, unreadable or another shape)."""
    import torch

    from peftctl.userfiles import BadFileError, load_safetensors

    if not path.is_file():
        return None
    try:
        got = load_safetensors(path).get("logps")
    except (BadFileError, OSError):
        return None
    if got is None or tuple(got.shape) != (pairs, 2) or got.dtype != torch.float32:
        return None
    return got.contiguous()


def write_cached(path: Path, logps, split: str) -> None:
    from safetensors.torch import save

    from peftctl.fsio import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"logps": logps.contiguous()}, metadata={"split": split}))


def compute(model, examples, batch_size: int, pad_id: int, device, adapter_off: bool, accelerator,
            reporter: Reporter, label: str):
    """(N, 2) float32 on the host, every process holding the same numbers: each process computes
    its share of the batches (`preference.reference_logps`), shown by a progress bar, then the
    shares are summed across the processes."""
    import torch

    from peftctl.preference import reference_logps

    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    what = f"reference log-probabilities ({label}" + (f", this process's share of {world})" if world > 1 else ")")
    # Where the model is: the run's device, but the host under FSDP, which loads the whole model
    # there and shards it afterwards (the reference is the model before any checkpoint or sharding).
    param = next(iter(model.parameters()), None)
    run_on = param.device if param is not None and param.device.type != "meta" else device
    if run_on != device and run_on.type == "cpu":
        reporter.log(f"{label}: the model is on the host until it is sharded: its reference pass runs there")

    def progress(done: int, total: int) -> None:
        if done == 0:
            reporter.start(total, what, unit="pairs")
        else:
            reporter.advance(done, {})

    try:
        out = reference_logps(model, examples, batch_size, pad_id, run_on, adapter_off=adapter_off,
                              share=(rank, world), progress=progress)
    finally:
        reporter.stop()
    if world > 1:
        out = accelerator.reduce(out.to(device), reduction="sum").to("cpu", torch.float32)
    return out


def reference_logps(recipe, model, splits: dict, pad_id: int, accelerator, reporter: Reporter,
                    kernels: Any = None, device=None) -> dict[str, Any]:
    """{split: (N, 2) float32 host tensor} for `splits` ({name: ExampleSet}), each read from the
    cache when its key is there, else computed (shared among the processes of `accelerator`; None:
    one process, on `device`) and cached."""
    import torch

    device = accelerator.device if accelerator is not None else device
    world = accelerator.num_processes if accelerator is not None else 1
    main = accelerator is None or accelerator.is_main_process
    folder = cache_folder(recipe.data)
    adapter_off = recipe.train.init_adapter is None
    out = {}
    for name, examples in splits.items():
        path = got = None
        if folder is not None and main:
            path = folder / f"{cache_key(recipe, model, examples, device, kernels)}.safetensors"
            got = read_cached(path, len(examples))
        if world > 1 and folder is not None:
            from accelerate.utils import broadcast, broadcast_object_list

            box = [got is not None]
            broadcast_object_list(box, from_process=0)
            if box[0]:
                buf = got if main else torch.zeros(len(examples), 2, dtype=torch.float32)
                got = broadcast(buf.to(device), from_process=0).to("cpu", torch.float32)
        if got is not None:
            reporter.log(f"{name}: reference log-probabilities of {len(examples):,} pairs from the cache ({path})")
            out[name] = got
            continue
        reporter.log(f"{name}: computing the reference log-probabilities of {len(examples):,} pairs "
                     "(train.precompute_ref_log_probs)")
        out[name] = compute(model, examples, recipe.eval.batch_size, pad_id, device, adapter_off, accelerator,
                            reporter, name)
        if path is not None:
            try:
                write_cached(path, out[name], name)
                reporter.log(f"{name}: reference log-probabilities cached in {path}")
            except OSError as e:  # a cache that cannot be written costs the next run the computation, no more
                reporter.log(f"{name}: the reference log-probabilities could not be cached in {path} ({e})")
    return out
