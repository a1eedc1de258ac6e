"""Checkpoints: everything a run needs to continue exactly where it was.

RUN_DIR/checkpoints/step-000120/ holds the adapter (PEFT's format, so `peftctl eval --adapter`
takes it as is), optimizer.pt, scheduler.pt, scaler.pt (float16 only), adapter_hooks.pt (only for a
method whose training keeps state of its own: `peftctl.adapters.hooks`), rng_state.pt (Python,
NumPy, torch and CUDA generators of every process), recipe.yaml, and peftctl_state.json (step, data
position, counters, best eval, data file hashes; earlier versions named it trainer_state.json,
Hugging Face Trainer's name for a file of another schema, and such checkpoints still resume). A
checkpoint is built in a hidden temporary folder and renamed into place, so a kill at any instant
leaves the previous one intact and never a
half-written one under a step name. The `.pt` files are read back with `weights_only=True`: no
code runs on loading them.

A checkpoint to resume from is checked whole (`check`) before any model loads: every file it needs
is there and parses (the `.pt` files memory-mapped, so their tensors are not read twice), and
its state file holds the fields TrainState has with their types. A bad one is an input error
naming the file (`userfiles.BadFileError`), and nothing is written.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftctl.errors import InputError, PeftctlError
from peftctl.fsio import atomic_dir
from peftctl.userfiles import BadFileError, check_readable, read_json, reading, torch_load

CHECKPOINTS = "checkpoints"
STATE_FILE = "peftctl_state.json"
# What earlier versions named the state file (Hugging Face Trainer's name, another schema): read, never written.
LEGACY_STATE_FILES = ("trainer_state.json",)
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainState:
    """The loop's counters; saved as STATE_FILE in every checkpoint."""

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
    window_stats: dict[str, float] = field(default_factory=dict)  # preference metrics' sums (TRL's names)
    evals: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    data_sha256: dict[str, str] = field(default_factory=dict)
    trackers: dict[str, str] = field(default_factory=dict)  # e.g. the MLflow run id, to continue it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """The state in a state file's dict: `step` is required, other fields default; every
        field present must have its type (ValueError naming the field). Unknown keys are ignored."""
        if "step" not in d:
            raise ValueError("no step")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if key in hints and not _conforms(value, hints[key]):
                raise ValueError(f"{key} must be {_type_name(hints[key])} (got {value!r:.60})")
        if not 0 <= d["step"] < 2**53:  # a count of optimizer steps, exact in float64 (the schedule)
            raise ValueError(f"step must be an integer from 0 to 2**53 (got {d['step']})")
        return cls(**{k: v for k, v in d.items() if k in hints})


def _conforms(value: Any, tp: Any) -> bool:
    """Whether a JSON value has the type a TrainState field is annotated with."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp in (int, float):  # JSON has one number type; a bool is not a count
        return isinstance(value, int | float if tp is float else int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", type(None): "null"}
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return names.get(tp, {list: "a list", dict: "an object"}.get(typing.get_origin(tp), str(tp)))


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def state_file(ckpt: Path) -> Path | None:
    """A checkpoint's state file: STATE_FILE, else one of LEGACY_STATE_FILES; None when it has neither."""
    for name in (STATE_FILE, *LEGACY_STATE_FILES):
        if (Path(ckpt) / name).is_file():
            return Path(ckpt) / name
    return None


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders have hidden names and never match)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and state_file(p) is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def read_state(ckpt: Path) -> TrainState:
    path = state_file(ckpt) or Path(ckpt) / STATE_FILE  # missing: the error names today's name
    d = read_json(path, "a checkpoint's training state")
    try:
        return TrainState.from_dict(d)
    except ValueError as e:
        raise BadFileError(path, f"not a checkpoint's training state: {e}") from None


# The files a checkpoint must hold besides the adapter, and what each is (scaler.pt: float16 runs only).
PAYLOAD_FILES = {"optimizer.pt": "an optimizer state", "scheduler.pt": "a learning-rate schedule state",
                 "rng_state.pt": "the random generators' states"}
HOOKS_FILE = "adapter_hooks.pt"
OPTIONAL_PAYLOAD_FILES = {"scaler.pt": "a loss scaler state", HOOKS_FILE: "the adapter method's training state"}


def check(ckpt: Path) -> tuple[TrainState, dict[str, Any]]:
    """Check every file of a checkpoint without loading a model: the state file, recipe.yaml,
    the adapter (config and safetensors header), and the `.pt` files (memory-mapped, pickles loaded
    with weights_only). Returns (state, the recipe it was written with, as a dict). A missing or bad
    file is `BadFileError` naming it."""
    from peftctl import recipe as recipe_lib
    from peftctl.runs import check_adapter_files

    ckpt = Path(ckpt)
    state = read_state(ckpt)
    check_readable(ckpt / "recipe.yaml", "the recipe the checkpoint was written with")
    saved = recipe_lib.load(ckpt / "recipe.yaml").model_dump(mode="json")
    check_adapter_files(ckpt)
    for name, what in PAYLOAD_FILES.items():
        torch_load(ckpt / name, what, mmap=True)
    for name, what in OPTIONAL_PAYLOAD_FILES.items():
        if (ckpt / name).exists():
            torch_load(ckpt / name, what, mmap=True)
    return state, saved


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
    embeddings included), for `PeftModel.save_adapter(..., tensors=)` on the main process. Under
    FSDP2 every process must call this (it gathers)."""
    out = {}
    for key, t in peft_model.adapter_tensors_to_save("default").items():
        t = t.detach()
        if _is_sharded(t):
            t = t.full_tensor()
        out[key] = t.to("cpu").contiguous().clone()
    return out


def copy_adapter(src: Path, dest: Path) -> None:
    """Copy a checkpoint's adapter files into a folder (each file replaced atomically)."""
    from peftctl.adapters.config import CONFIG_NAME, WEIGHTS_NAME
    from peftctl.fsio import atomic_file

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with atomic_file(dest / name) as tmp:
            shutil.copyfile(src / name, tmp)


def check_same_adapter(config, folder: Path, what: str, against: str = "the recipe's") -> None:
    """InputError unless the adapter saved in `folder` computes, with its weights, what an adapter of
    `config` would (`AdapterConfig.differences`: method, rank, scaling, targets, ...): its weights
    copied into another adapter would silently change the model."""
    from peftctl.adapters.config import CONFIG_NAME, read_config_file

    saved = read_config_file(Path(folder) / CONFIG_NAME)
    diff = config.differences(saved)
    if diff:
        raise InputError(f"{what}: the adapter in {folder} is not {against} adapter (its value vs "
                         f"{against}: {'; '.join(diff)})" + ("; make the recipe's adapter section match its "
                                                             "adapter_config.json" if against == "the recipe's" else ""))


def load_adapter(peft_model, ckpt: Path, what: str | None = None) -> None:
    """Copy a checkpoint's (or, `what` naming the recipe field, any saved adapter's) weights into
    the (not yet sharded) model."""
    from peftctl.adapters import io

    try:
        if what is not None and not io.has_adapter(ckpt):
            raise InputError(f"{what}: {ckpt} holds no adapter (adapter_model.safetensors)")
        if what is not None:
            check_same_adapter(peft_model.peft_config["default"], ckpt, what)
        peft_model.base_model.load_adapter_tensors("default", io.read_weights(ckpt), str(ckpt))
    except PeftctlError:
        raise  # a bad file: the error names it
    except ValueError as e:
        raise InputError(f"{what}: {e}" if what else str(e)) from None


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
    adapter: dict[str, torch.Tensor] | None  # gathered under FSDP; else None: save_adapter reads the model
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: list[dict[str, Any]]  # one per process
    state: TrainState
    hooks: dict[str, Any] | None = None  # the adapter method's training state (hooks.py); None: it keeps none


def write(run_dir: Path, peft_model, payload: Payload, recipe_yaml: str, keep: int) -> Path:
    """Write a checkpoint atomically, then prune old ones (keeping the best). Main process only."""
    final = Path(run_dir) / CHECKPOINTS / step_name(payload.step)
    # The same step again (a resumed run that had already finished) replaces the old checkpoint.
    with atomic_dir(final, exists="replace", what="checkpoint folder") as tmp:
        peft_model.save_adapter("default", tmp, tensors=payload.adapter)
        _save(payload.optimizer, tmp / "optimizer.pt")
        _save(payload.scheduler, tmp / "scheduler.pt")
        if payload.scaler is not None:
            _save(payload.scaler, tmp / "scaler.pt")
        if payload.hooks is not None:
            _save(payload.hooks, tmp / HOOKS_FILE)
        _save(payload.rng, tmp / "rng_state.pt")
        (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        # Written last: a folder with a state file is complete.
        (tmp / STATE_FILE).write_text(json.dumps(asdict(payload.state), indent=1) + "\n", encoding="utf-8")
    prune(run_dir, keep, payload.state.best_step)
    return final


def _save(obj: Any, path: Path) -> None:
    # Through a Python file object: a failed write then carries its OSError (a full disk, the
    # file-size limit) as the context of torch's "unexpected pos" error (fsio.disk_full_reason).
    with open(path, "wb") as f:
        torch.save(obj, f)


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
    """The `.pt` files' contents by name without the suffix ("optimizer", ...; "scaler": None when
    the run had none). Errors are `BadFileError` naming the file."""
    out = {name.removesuffix(".pt"): torch_load(ckpt / name, what) for name, what in PAYLOAD_FILES.items()}
    for name, what in OPTIONAL_PAYLOAD_FILES.items():
        out[name.removesuffix(".pt")] = torch_load(ckpt / name, what) if (ckpt / name).exists() else None
    out["rng"] = out.pop("rng_state")
    return out


def restore(ckpt: Path, model, optimizer, scheduler, scaler, accelerator, fsdp: bool, reporter,
            hooks=None) -> TrainState:
    """Load a checkpoint's optimizer, schedule, loss scaler, adapter-method (`hooks`: a HookSet) and
    RNG states (the adapter weights are loaded before the model is prepared: `load_adapter`).
    Returns its TrainState."""
    state = read_state(ckpt)
    files = read_payload_files(ckpt)
    if hooks:
        if files["adapter_hooks"] is None:
            raise BadFileError(ckpt / HOOKS_FILE, "missing: this run's adapter method keeps training state of its "
                                                  "own, which a resumed run needs")
        with reading(ckpt / HOOKS_FILE, "the adapter method's training state for this run's adapter"):
            hooks.load_state_dict(files["adapter_hooks"])
    with reading(ckpt / "optimizer.pt", "an optimizer state that fits this run's adapter and optimizer"):
        load_optimizer_state(model, optimizer, files["optimizer"], fsdp)
    # The schedule continues from the checkpoint's step, with the recipe's own peak lr.
    base_lrs = list(scheduler.base_lrs)
    with reading(ckpt / "scheduler.pt", "a learning-rate schedule state"):
        scheduler.load_state_dict(files["scheduler"])
    scheduler.base_lrs = base_lrs
    for group, base, fn in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if scaler is not None and files["scaler"] is not None:
        with reading(ckpt / "scaler.pt", "a loss scaler state"):
            scaler.load_state_dict(files["scaler"])
    rngs, world = files["rng"], accelerator.num_processes
    if not isinstance(rngs, list) or not rngs:
        raise BadFileError(ckpt / "rng_state.pt", "not the random generators' states (a list with one per process)")
    if len(rngs) != world:
        reporter.log(f"the checkpoint was written by {len(rngs)} processes, this run has {world}: "
                     "random streams (dropout) restart from its first")
    with reading(ckpt / "rng_state.pt", "the random generators' states"):
        set_rng_state(rngs[min(accelerator.process_index, len(rngs) - 1)])
    state.world_size = world
    return state


# ---- what a resumed recipe may change ----------------------------------------------------------------

# Changing these makes the checkpoint a different run: refused.
_MUST_MATCH = ("model.name_or_path", "model.revision", "model.tokenizer", "model.task", "model.labels", "adapter.", "data.",
               "train.seed", "train.init_adapter")  # the starting adapter is also the DPO reference


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
