"""`peftctl inspect`: what a recipe would train (built on the meta device: no weights loaded) and,
with `--memory`, its peak training memory; or what a saved adapter holds (read from its config and
the safetensors header: no tensors loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.errors import InputError


def meta_model(recipe):
    """(the PeftModel a run of `recipe` trains, built on the meta device; the model config; dtype).

    A quantized base gets bitsandbytes' layer types where loading would put them, so the adapter
    layers, the parameter counts and the memory estimate are those of the real run.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from peftctl import models
    from peftctl.adapters import attach

    spec = recipe.model
    source = models.resolve(spec.name_or_path, spec.cache_dir, convert=False)
    models.check_model_files(spec, source)  # headers only: a truncated weights file shows before a real run
    config = models.load_config(spec, source)
    dtype = models.resolve_dtype(spec.dtype)
    # The attention implementation loading gives (packing shapes its batches for it).
    kw = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code, **kw)
    if recipe.model.quantization is not None:
        models.quantize_skeleton(model, recipe.model.quantization, dtype)
    try:
        return attach(model, recipe.adapter), config, dtype
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
            "rank": dict(getattr(module, "r", {})),  # LoRA's ranks by adapter
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
        from peftctl import memory

        result["memory"] = memory.estimate(
            peft_model, config, workload=workload, gradient_checkpointing=recipe.uses_gradient_checkpointing(),
            optimizer=recipe.train.optimizer, momentum=recipe.train.momentum,
        )
        result["memory"]["workload"] = {"batch": workload.batch, "seq_len": workload.seq_len,
                                        "loss_fraction": workload.loss_fraction}
    return result


def _quantized(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


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
    for name in sorted(by_module):
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
        "other_tensors": {k: other[k] for k in sorted(other)},
        "adapter_params": total,
        "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
        "other_adapters": sorted(p.name for p in folder.iterdir() if p.is_dir() and has_adapter(p)),
    }
    s = read_summary(folder)
    if s is not None:
        result["run"] = {k: s.get(k) for k in ("status", "steps", "train_loss", "final_eval", "trainable_params")}
    return result
