"""`peftctl inspect`: what a recipe would train (built on the meta device: no weights loaded) and,
with `--memory`, its peak training memory; or what a saved adapter holds (read from its config and
the safetensors header: no tensors loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.errors import InputError

# What a recipe would train is the dry run's model summary (`peftctl train --dry-run` shows it too).
from peftctl.train.plan import inspect_recipe  # noqa: F401  (re-exported: `peftctl inspect RECIPE`)


def _saved_shapes(folder: Path) -> dict[str, list[int]]:
    from peftctl.adapters.config import WEIGHTS_NAME
    from peftctl.userfiles import safetensors_keys

    return {k: list(shape) for k, (_, shape) in safetensors_keys(folder / WEIGHTS_NAME).items()}


_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Method, rank, alpha, targets and parameter counts of a saved adapter (a run folder or any
    PEFT adapter folder); adapters saved under other names (subfolders) are listed too."""
    import math

    from peftctl.adapters.config import AdapterConfig
    from peftctl.adapters.io import PREFIX, has_adapter
    from peftctl.adapters.lora.config import lora_scaling
    from peftctl.adapters.matching import saved_pattern_value
    from peftctl.runs import check_adapter_files, read_summary

    folder = Path(path)
    if not has_adapter(folder):
        raise InputError(f"{folder}: no adapter here (adapter_config.json and adapter_model.safetensors)")
    check_adapter_files(folder)  # a bad file is an error naming it
    config = AdapterConfig.from_pretrained(folder)
    shapes = _saved_shapes(folder)
    modules = []
    for key, shape in shapes.items() if config.method == "lora" else ():
        suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        name = key.removeprefix(PREFIX).removesuffix(suffix)
        rank = shape[0]
        try:
            alpha = saved_pattern_value(config.alpha_pattern, name, config.lora_alpha, "alpha_pattern")
        except ValueError as e:
            raise InputError(f"{folder}: {e}") from None
        params = sum(math.prod(s) for k, s in shapes.items() if k.startswith(f"{PREFIX}{name}.lora_"))
        modules.append({
            "module": name, "rank": rank, "lora_alpha": alpha,
            "scaling": lora_scaling(alpha, rank, config.use_rslora), "params": params,
        })
    counted = {k for k in shapes if any(k.startswith(f"{PREFIX}{m['module']}.lora_") for m in modules)}
    other = {k.removeprefix(PREFIX): s for k, s in shapes.items() if k not in counted}
    total = sum(math.prod(s) for s in shapes.values())
    options = ("r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "bias", "lora_bias",
               "init_lora_weights", "target_modules", "exclude_modules", "modules_to_save",
               "layers_to_transform", "rank_pattern", "alpha_pattern", "task_type")
    result = {
        "path": str(folder),
        "method": config.method,
        "peft_type": config.peft_type,
        "base_model": config.base_model_name_or_path,
        "config": {k: getattr(config, k) for k in options if hasattr(config, k)},
        "modules": sorted(modules, key=lambda m: m["module"]),
        "other_tensors": {k: other[k] for k in sorted(other)},
        "adapter_params": total,
        "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
        "other_adapters": sorted(p.name for p in folder.iterdir() if p.is_dir() and has_adapter(p)),
    }
    s = read_summary(folder)
    if s is not None:
        result["run"] = {k: s.get(k) for k in ("status", "steps", "train_loss", "final_eval", "trainable_params")}
    return result
