"""PEFT's on-disk adapter format: adapter_config.json plus adapter_model.safetensors.

Saved keys drop the adapter's name: in memory a LoRA weight is
`<module path>.lora_A.<adapter>.weight`; on disk it is `base_model.model.<module path>.lora_A.weight`.
An adapter not named "default" is saved in a subfolder of its name, as PEFT does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from peftctl.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from peftctl.adapters.layer import AdapterLayer
from peftctl.fsio import atomic_file

PREFIX = "base_model.model."
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Map saved key -> live tensor for one adapter (model: the wrapped transformers model)."""
    out: dict[str, torch.Tensor] = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            key = f"{PREFIX}{module_name}.{attr}"
            if isinstance(item, nn.Parameter | torch.Tensor):
                out[key] = item
            else:
                for pname, p in item.named_parameters():
                    out[f"{key}.{pname}"] = p
    return out


def adapter_folder(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    d = Path(save_directory)
    return d if adapter_name == "default" else d / adapter_name


def save_weights(model: nn.Module, adapter_name: str, folder: Path, dtype: torch.dtype | None = None) -> None:
    tensors = {}
    for key, t in adapter_tensors(model, adapter_name).items():
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        tensors[key] = t.to("cpu").contiguous().clone()
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def read_weights(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    pickle_path = folder / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path} is a pickle file, which can run code when loaded; pass "
                "allow_pickle=True if you trust it (or convert it to safetensors)"
            )
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")


def load_weights(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into the live adapter weights; every key must match, both ways."""
    live = adapter_tensors(model, adapter_name)
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"{source}: adapter weights do not fit this model: " + "; ".join(parts))
    with torch.no_grad():
        for key, target in live.items():
            src = tensors[key]
            if src.shape != target.shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(src.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(src.to(device=target.device, dtype=target.dtype))


def has_adapter(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and (
        (folder / WEIGHTS_NAME).is_file() or (folder / PICKLE_WEIGHTS_NAME).is_file()
    )
