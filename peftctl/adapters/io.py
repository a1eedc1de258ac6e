"""PEFT's on-disk adapter format: adapter_config.json plus adapter_model.safetensors.

Saved keys drop the adapter's name: in memory a LoRA weight is
`<module path>.lora_A.<adapter>.weight`; on disk it is `base_model.model.<module path>.lora_A.weight`.
A `modules_to_save` copy is saved under the module's own path (`base_model.model.score.weight`),
trained biases (`bias: all | lora_only`) under theirs (`...q_proj.base_layer.bias`).
An adapter not named "default" is saved in a subfolder of its name, as PEFT does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peftctl.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper
from peftctl.fsio import atomic_file
from peftctl.userfiles import BadFileError, load_safetensors, torch_load

PREFIX = "base_model.model."
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def wrappers(model: nn.Module):
    """(name, module) for every adapter layer and modules_to_save wrapper, outermost only."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
            inside.append(name)
            yield name, module


def trained_biases(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """The base model's biases that `bias` (none | all | lora_only) trains, by parameter name."""
    if bias == "none":
        return {}
    if bias == "lora_only":
        out = {}
        for name, layer in wrappers(model):
            b = layer.base_layer._parameters.get("bias") if isinstance(layer, AdapterLayer) else None
            if b is not None:
                out[f"{name}.base_layer.bias"] = b
        return out
    # all: every bias of the base model, not the adapters' own (lora_B's) nor modules_to_save copies.
    skip = []
    for name, module in wrappers(model):
        if isinstance(module, AdapterLayer):
            skip += [f"{name}.{attr}." for attr in module.adapter_layer_names]
        else:
            skip.append(f"{name}.")
    return {
        name: p for name, p in model.named_parameters()
        if (name == "bias" or name.endswith(".bias")) and not any(name.startswith(s) for s in skip)
    }


def adapter_tensors(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """Map saved key -> live tensor for one adapter (model: the wrapped transformers model)."""
    out: dict[str, torch.Tensor] = {}
    for module_name, module in wrappers(model):
        for key, t in module.adapter_state_dict(adapter_name).items():
            out[f"{PREFIX}{module_name}.{key}"] = t
    out.update({PREFIX + name: p for name, p in trained_biases(model, bias).items()})
    return out


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input and output embedding matrices, under PEFT's keys (`save_embedding_layers=True`)."""
    out: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is None or id(module) not in names:
            continue
        name = names[id(module)]
        if isinstance(module, AdapterLayer):
            name, module = f"{name}.base_layer", module.base_layer
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            out[f"{PREFIX}{name}.weight"] = module.weight
    return out


def adapter_folder(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    d = Path(save_directory)
    return d if adapter_name == "default" else d / adapter_name


def save_tensors(live: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype | None = None) -> None:
    tensors = {}
    for key, t in live.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # A copy per key: safetensors refuses shared storage (tied weights).
        tensors[key] = t.to("cpu").contiguous().clone()
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def read_weights(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter folder's weights file. A missing, truncated or corrupt file is
    `BadFileError` (a ValueError) naming it; a pickle file is read only with `allow_pickle`, and
    then with `weights_only=True`."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        return load_safetensors(path)
    pickle_path = folder / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise BadFileError(pickle_path, "a pickle file, which can run code when loaded; pass "
                                            "allow_pickle=True if you trust it (or convert it to safetensors)")
        state = torch_load(pickle_path, "an adapter's weights (a state dict of tensors)")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadFileError(pickle_path, "not an adapter's weights (a state dict of tensors)")
        return state
    raise BadFileError(path, f"missing: the adapter folder {folder} holds no weights ({WEIGHTS_NAME})")


def load_weights(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], source: str,
                 bias: str = "none") -> None:
    """Copy saved tensors into the live adapter weights; every adapter key must match, both ways.

    A file may also hold base-model weights (PEFT saves the embedding matrices when an embedding
    is adapted); keys that name a parameter of the model are loaded into it, as PEFT does.
    """
    live = adapter_tensors(model, adapter_name, bias)
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    if unexpected:
        params = {PREFIX + n: p for n, p in model.named_parameters(remove_duplicate=False)}
        live.update({k: params[k] for k in unexpected if k in params})
        unexpected = [k for k in unexpected if k not in params]
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
