"""`peftctl inspect`: what a recipe would train (built on the meta device: no weights loaded) and,
with `--memory`, its peak training memory; or what a saved adapter holds (read from its config and
the safetensors header: no tensors loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.adapters.matching import natural_key
from peftctl.errors import InputError

# What a recipe would train is the dry run's model summary (`peftctl train --dry-run` shows it too).
from peftctl.train.plan import inspect_recipe  # noqa: F401  (re-exported: `peftctl inspect RECIPE`)


def _saved_shapes(folder: Path) -> dict[str, list[int]]:
    from peftctl.adapters.config import WEIGHTS_NAME
    from peftctl.userfiles import safetensors_keys

    return {k: list(shape) for k, (_, shape) in safetensors_keys(folder / WEIGHTS_NAME).items()}


# Fields of every config that say where an adapter came from rather than what it is.
_BOOKKEEPING = ("method", "inference_mode", "base_model_name_or_path", "revision")


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Method, options, adapted modules (each with its parameter count and what the method says of
    it: LoRA's rank, alpha and scaling, IA3's scaled side) and the other saved tensors of a saved
    adapter (a run folder or any PEFT adapter folder of a method peftctl implements); adapters
    saved under other names (subfolders) are listed too."""
    import math

    from peftctl.adapters.config import AdapterConfig
    from peftctl.adapters.io import PREFIX, has_adapter
    from peftctl.runs import check_adapter_files, read_summary

    folder = Path(path)
    if not has_adapter(folder):
        raise InputError(f"{folder}: no adapter here (adapter_config.json and adapter_model.safetensors)")
    check_adapter_files(folder)  # a bad file is an error naming it
    config = AdapterConfig.from_pretrained(folder)
    shapes = _saved_shapes(folder)
    # A key's module is the path before its first part with the method's prefix (lora_A, ia3_l, ...).
    by_module: dict[str, dict[str, list[int]]] = {}
    other = {}
    for key, shape in shapes.items():
        parts = key.removeprefix(PREFIX).split(".")
        cut = next((i for i, p in enumerate(parts) if config.prefix and p.startswith(config.prefix)), None)
        if cut:
            by_module.setdefault(".".join(parts[:cut]), {})[".".join(parts[cut:])] = shape
        else:
            other[key.removeprefix(PREFIX)] = shape
    modules = []
    for name in sorted(by_module, key=natural_key):  # layers.2 before layers.10
        try:
            described = config.describe_module(name, by_module[name])
        except ValueError as e:
            raise InputError(f"{folder}: {e}") from None
        modules.append({"module": name, **described,
                        "params": sum(math.prod(s) for s in by_module[name].values())})
    total = sum(math.prod(s) for s in shapes.values())
    result = {
        "path": str(folder),
        "method": config.method,
        "peft_type": config.peft_type,
        "base_model": config.base_model_name_or_path,
        "config": {k: v for k, v in config.model_dump(mode="json").items() if k not in _BOOKKEEPING},
        "modules": modules,
        "other_tensors": {k: other[k] for k in sorted(other, key=natural_key)},
        "adapter_params": total,
        "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
        "other_adapters": sorted(p.name for p in folder.iterdir() if p.is_dir() and has_adapter(p)),
    }
    s = read_summary(folder)
    if s is not None:
        result["run"] = {k: s.get(k) for k in ("status", "steps", "train_loss", "final_eval", "trainable_params")}
    return result
