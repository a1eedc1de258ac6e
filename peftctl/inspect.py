"""`peftctl inspect`: what a recipe would train (built on the meta device: no weights loaded)."""

from __future__ import annotations

from typing import Any

from peftctl.errors import InputError


def inspect_recipe(recipe) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from peftctl import models
    from peftctl.adapters import attach
    from peftctl.adapters.layer import AdapterLayer

    source = models.resolve(recipe.model.name_or_path, recipe.model.cache_dir, convert=False)
    config = models.load_config(recipe.model, source)
    dtype = models.resolve_dtype(recipe.model.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    try:
        peft_model = attach(model, recipe.adapter)
    except (ValueError, TypeError) as e:
        raise InputError(f"adapter: {e}") from None
    rows = []
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        base = module.get_base_layer()
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        weight = getattr(base, "weight", None)
        rows.append({
            "module": name,
            "type": type(base).__name__,
            "shape": list(weight.shape) if weight is not None else None,
            "rank": {k: v for k, v in getattr(module, "r", {}).items()},
            "trainable_params": params,
        })
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {
        "model": recipe.model.name_or_path,
        "model_type": getattr(config, "model_type", None),
        "dtype": str(dtype).removeprefix("torch."),
        "method": recipe.adapter.method,
        "modules": rows,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
    }
