"""Checkpoints: everything a run needs to continue exactly where it was.

RUN_DIR/checkpoints/step-000120/ holds the adapter (PEFT's format, so `peftctl eval --adapter`
takes it as is), optimizer.pt, scheduler.pt, scaler.pt (float16 only), rng_state.pt (Python,
NumPy, torch and CUDA generators of every process), recipe.yaml, and trainer_state.json (step, data
position, counters, best eval, data file hashes). A checkpoint is built in a hidden temporary
folder and renamed into place, so a kill at any instant leaves the previous one intact and never a
half-written one under a step name. The `.pt` files are read back with `weights_only=True`: no
code runs on loading them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftctl.errors import InputError
from peftctl.fsio import apply_umask, atomic_write_text, temp_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainState:
    """The loop's counters; saved as trainer_state.json in every checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of the current epoch already consumed, over all processes
    tokens_seen: int = 0
    loss_tokens_seen: int = 0
    skipped_steps: int = 0
    collapsed_steps: int = 0  # consecutive steps with the signature of a collapsed model (loop.py)
    last_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    train_time_s: float = 0.0  # training time of earlier attempts, for tokens/s over the whole run
    # The metrics window since the last log line, so a resumed run logs what an uninterrupted one would.
    window_loss: float = 0.0
    window_tokens: float = 0.0
    window_inputs: float = 0.0
    evals: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    data_sha256: dict[str, str] = field(default_factory=dict)
    trackers: dict[str, str] = field(default_factory=dict)  # e.g. the MLflow run id, to continue it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders have hidden names and never match)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def read_state(ckpt: Path) -> TrainState:
    try:
        return TrainState.from_dict(json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{ckpt}: not a readable checkpoint ({e})") from None


# ---- RNG states ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generators, as tensors and plain values (loadable with weights_only=True)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- adapter and optimizer, also under FSDP ---------------------------------------------------------


def _is_sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """Saved key -> full CPU tensor: what save_pretrained writes (biases the adapter trains and resized
    embeddings included). Under FSDP2 every process must call this (it gathers)."""
    out = {}
    for key, t in peft_model.adapter_tensors_to_save("default").items():
        t = t.detach()
        if _is_sharded(t):
            t = t.full_tensor()
        out[key] = t.to("cpu").contiguous().clone()
    return out


def save_adapter(peft_model, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Write an adapter folder in PEFT's format from gathered tensors (main process only)."""
    from safetensors.torch import save_file

    from peftctl.adapters.config import WEIGHTS_NAME
    from peftctl.fsio import atomic_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    peft_model.saved_config("default").save_pretrained(folder)


def copy_adapter(src: Path, dest: Path) -> None:
    """Copy a checkpoint's adapter files into a folder (each file replaced atomically)."""
    from peftctl.adapters.config import CONFIG_NAME, WEIGHTS_NAME
    from peftctl.fsio import atomic_file

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with atomic_file(dest / name) as tmp:
            shutil.copyfile(src / name, tmp)


def load_adapter(peft_model, ckpt: Path) -> None:
    """Copy a checkpoint's adapter weights into the (not yet sharded) model."""
    from peftctl.adapters import io

    try:
        io.load_weights(peft_model.base_model.model, "default", io.read_weights(ckpt), str(ckpt))
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None


def optimizer_state(model, optimizer, fsdp: bool) -> dict[str, Any]:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=opts)


def load_optimizer_state(model, optimizer, state: dict[str, Any], fsdp: bool) -> None:
    """Load optimizer state but keep the recipe's hyperparameters (a resumed recipe may change them)."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state, options=opts)
    else:
        optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)


# ---- writing ----------------------------------------------------------------------------------------


@dataclass
class Payload:
    """What a checkpoint holds, gathered on every process, written by the main one."""

    step: int
    adapter: dict[str, torch.Tensor] | None  # gathered under FSDP; else None: save_pretrained reads the model
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: list[dict[str, Any]]  # one per process
    state: TrainState


def write(run_dir: Path, peft_model, payload: Payload, recipe_yaml: str, keep: int) -> Path:
    """Write a checkpoint atomically, then prune old ones (keeping the best). Main process only."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(payload.step)
    tmp = temp_dir(root, final.name)
    try:
        if payload.adapter is None:
            peft_model.save_pretrained(tmp)
        else:
            save_adapter(peft_model, payload.adapter, tmp)
        _save(payload.optimizer, tmp / "optimizer.pt")
        _save(payload.scheduler, tmp / "scheduler.pt")
        if payload.scaler is not None:
            _save(payload.scaler, tmp / "scaler.pt")
        _save(payload.rng, tmp / "rng_state.pt")
        (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        # Written last: a folder with a trainer_state.json is complete.
        atomic_write_text(tmp / STATE_FILE, json.dumps(asdict(payload.state), indent=1) + "\n")
        apply_umask(tmp)
        _fsync_dir(tmp)
        if final.exists():  # the same step again (a resumed run that had already finished)
            old = root / f".{final.name}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(run_dir, keep, payload.state.best_step)
    return final


def _save(obj: Any, path: Path) -> None:
    # Through a Python file object: a failed write then carries its OSError (a full disk, the
    # file-size limit) as the context of torch's "unexpected pos" error (fsio.disk_full_reason).
    with open(path, "wb") as f:
        torch.save(obj, f)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(run_dir: Path, keep: int, best_step: int | None) -> None:
    found = checkpoint_dirs(run_dir)
    for step, path in found[:-keep]:
        if step != best_step:
            shutil.rmtree(path, ignore_errors=True)


def clear_after(run_dir: Path, step: int) -> list[str]:
    """Before continuing from `step`: delete temporary folders a killed process left, and the
    checkpoints of later steps (a resume from an older checkpoint abandons them; left in place,
    `--resume auto` would pick them next time). Returns the names of the deleted checkpoints."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    for p in root.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            shutil.rmtree(p, ignore_errors=True)
    later = [p for s, p in checkpoint_dirs(run_dir) if s > step]
    for p in later:
        shutil.rmtree(p)
    return [p.name for p in later]


def read_payload_files(ckpt: Path) -> dict[str, Any]:
    def load(name: str):
        path = ckpt / name
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    return {"optimizer": load("optimizer.pt"), "scheduler": load("scheduler.pt"),
            "scaler": load("scaler.pt"), "rng": load("rng_state.pt")}


def restore(ckpt: Path, model, optimizer, scheduler, scaler, accelerator, fsdp: bool, reporter) -> TrainState:
    """Load a checkpoint's optimizer, schedule, loss scaler and RNG states (the adapter weights
    are loaded before the model is prepared: `load_adapter`). Returns its TrainState."""
    state = read_state(ckpt)
    files = read_payload_files(ckpt)
    load_optimizer_state(model, optimizer, files["optimizer"], fsdp)
    # The schedule continues from the checkpoint's step, with the recipe's own peak lr.
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(files["scheduler"])
    scheduler.base_lrs = base_lrs
    for group, base, fn in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if scaler is not None and files["scaler"] is not None:
        scaler.load_state_dict(files["scaler"])
    rngs, world = files["rng"], accelerator.num_processes
    if len(rngs) != world:
        reporter.log(f"the checkpoint was written by {len(rngs)} processes, this run has {world}: "
                     "random streams (dropout) restart from its first")
    set_rng_state(rngs[min(accelerator.process_index, len(rngs) - 1)])
    state.world_size = world
    return state


# ---- what a resumed recipe may change ----------------------------------------------------------------

# Changing these makes the checkpoint a different run: refused.
_MUST_MATCH = ("model.name_or_path", "model.revision", "model.tokenizer", "adapter.", "data.", "train.seed")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def compare(saved: dict[str, Any], current: dict[str, Any], saved_hashes: dict[str, str],
            current_hashes: dict[str, str]) -> tuple[list[str], list[str]]:
    """(refusals, notes): what changed between a checkpoint's recipe and the current one."""
    a, b = _flatten(saved), _flatten(current)
    refusals, notes = [], []
    for key in sorted(set(a) | set(b)):
        if key.startswith("output.") or a.get(key) == b.get(key):
            continue
        change = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        matters = any(key == m or (m.endswith(".") and key.startswith(m)) for m in _MUST_MATCH)
        (refusals if matters else notes).append(change)
    for name, digest in saved_hashes.items():
        key = f"data.{name}"
        if name in current_hashes and current_hashes[name] != digest:
            refusals.append(f"{key}: the file's content changed since the checkpoint")
        elif name in current_hashes and a.get(key) != b.get(key):
            # The same content in another place (a moved folder): the same data.
            moved = next(r for r in refusals if r.startswith(f"{key}: "))
            refusals.remove(moved)
            notes.append(f"{moved} (same content)")
    return refusals, notes
