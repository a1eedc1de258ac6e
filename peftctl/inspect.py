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
            "rank": dict(getattr(module, "r", {})),
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


_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Method, rank, alpha, targets and parameter counts of a saved adapter (a run folder or any
    PEFT adapter folder); adapters saved under other names (subfolders) are listed too."""
    import math

    from peftctl.adapters.config import AdapterConfig
    from peftctl.adapters.io import PREFIX, has_adapter
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
            "scaling": alpha / (math.sqrt(rank) if config.use_rslora else rank), "params": params,
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
