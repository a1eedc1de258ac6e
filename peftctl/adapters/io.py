"""PEFT's on-disk adapter format: adapter_config.json plus adapter_model.safetensors.

Saved keys drop the adapter's name: in memory a LoRA weight is
`<module path>.lora_A.<adapter>.weight`; on disk it is `base_model.model.<module path>.lora_A.weight`.
A `modules_to_save` copy is saved under the module's own path (`base_model.model.score.weight`),
trained biases (`bias: all | lora_only`) under theirs (`...q_proj.base_layer.bias`).
An adapter not named "default" is saved in a subfolder of its name, as PEFT does.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peftctl.adapters.config import CONFIG_NAME, WEIGHTS_NAME
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.matching import outside_wrappers
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper
from peftctl.fsio import atomic_file
from peftctl.userfiles import BadFileError, load_safetensors, torch_load

PREFIX = "base_model.model."
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def wrappers(model: nn.Module):
    """(name, module) for every adapter layer and modules_to_save wrapper, outermost only."""
    return ((name, module) for name, module in outside_wrappers(model)
            if isinstance(module, AdapterLayer | ModulesToSaveWrapper))


def trained_biases(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """The base model's biases that `bias` (none | all | <method>_only: lora_only, vera_only) trains, by
    parameter name."""
    if bias == "none":
        return {}
    if bias.endswith("_only"):  # the adapted layers' biases (PEFT's rule)
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


def adapter_tensors(model: nn.Module, adapter_name: str, bias: str = "none",
                    extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Map saved key -> live tensor for one adapter (model: the wrapped transformers model; `extra`:
    tensors the adapter keeps outside its layers, already under their saved keys)."""
    out: dict[str, torch.Tensor] = dict(extra or {})
    for module_name, module in wrappers(model):
        for key, t in module.adapter_state_dict(adapter_name).items():
            out[f"{PREFIX}{module_name}.{key}"] = t
    out.update({PREFIX + name: p for name, p in trained_biases(model, bias).items()})
    return out


# PEFT's names for the embedding layers whose targeting makes "auto" save the embedding matrices.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{dotted name: module} of the input and output embedding layers (an adapted one as its wrapper)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Module] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter, lambda: None)()
        except (AttributeError, NotImplementedError):  # a model class without the method body
            module = None
        if module is not None and id(module) in names:
            out.setdefault(names[id(module)], module)
    return out


def embedding_tensors(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter (weight and bias) of the input and output embedding layers (or of those in
    `names`), under PEFT's keys: `base_model.model.<module>.weight`, or `<module>.base_layer.weight`
    for an adapted layer. A module trained in full (modules_to_save) is saved by the adapter itself."""
    out: dict[str, torch.Tensor] = {}
    for name, module in embedding_modules(model).items():
        if names is not None and name not in names or isinstance(module, ModulesToSaveWrapper):
            continue
        if isinstance(module, AdapterLayer):
            name, module = f"{name}.base_layer", module.get_base_layer()
        for key, p in module.named_parameters():
            out[f"{PREFIX}{name}.{key}"] = p
    return out


def embedding_targeted(model: nn.Module, config) -> bool:
    """PEFT's test of whether the config targets an embedding layer by name (embed_tokens, lm_head):
    a list naming one, or a regex matching a module so named."""
    spec = getattr(config, "target_modules", None)
    if isinstance(spec, str):
        if spec == "all-linear":
            return False
        return any(re.fullmatch(spec, n) for n, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
    return bool(spec) and any(e in spec for e in EMBEDDING_LAYER_NAMES)


def vocabulary_rows(model: nn.Module) -> int | None:
    """The number of rows of the input embedding matrix (the vocabulary the model reads)."""
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def base_vocab_size(base_model_name_or_path: str | None, revision: str | None = None) -> int | None:
    """`vocab_size` in the base model's config.json: a local folder's, or a hub model's from the local
    hub cache (no network). None when there is no such file (a GGUF base, an uncached hub id)."""
    if not base_model_name_or_path:
        return None
    folder = Path(base_model_name_or_path).expanduser()
    path: Path | None = folder / "config.json" if folder.is_dir() else None
    if path is None and not folder.exists() and base_model_name_or_path.count("/") <= 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model_name_or_path, "config.json", revision=revision)
        except Exception:  # not a valid repo id
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    from peftctl.userfiles import read_json

    config = read_json(path, "a model config")
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def embeddings_to_save(model: nn.Module, config, save_embedding_layers: bool | str,
                       base_vocab: int | None) -> tuple[list[str], str | None]:
    """Which embedding layers an adapter file holds, and why ("auto" decided to save them).

    - True: the input and output embeddings (the adapted ones only, when the config targets an
      embedding by name, as in PEFT); a model without transformers' embedding getters (any other
      module) has none to save, and a warning says so (as in PEFT).
    - "auto" (PEFT's default): all of them when the vocabulary (input embedding rows) differs from
      `base_vocab`, the base model's; else the adapted ones when the config targets an embedding
      by name; else none. PEFT checks the vocabulary only when no embedding is targeted and then
      drops a resized embedding that is not targeted; here both are kept.
    - False: none.
    """
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be true, false or 'auto' (got {save_embedding_layers!r})")
    if save_embedding_layers is False:
        return [], None
    modules = embedding_modules(model)
    if save_embedding_layers is True and not modules:
        # As PEFT: say so rather than save nothing silently.
        warnings.warn(f"save_embedding_layers=True: no embedding layer found ({type(model).__name__} has no "
                      "get_input_embeddings / get_output_embeddings, as transformers models have), so none is "
                      "saved; to save an embedding with the adapter, adapt it (target_modules) or train it in "
                      "full (modules_to_save)", UserWarning, stacklevel=4)
    targeted = embedding_targeted(model, config)
    adapted = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]
    rows = vocabulary_rows(model)
    if save_embedding_layers == "auto" and base_vocab is not None and rows is not None and rows != base_vocab:
        return list(modules), (f"the vocabulary has {rows} tokens and the base model's {base_vocab}: "
                               "the embedding layers were resized, so they are saved with the adapter")
    if targeted:
        why = "embedding layers are among target_modules, so they are saved with the adapter"
        return adapted, why if save_embedding_layers == "auto" and adapted else None
    return (list(modules), None) if save_embedding_layers is True else ([], None)


def check_adapter_name(name) -> str:
    """An adapter name is a plain name: it becomes a folder name on save (PEFT's layout) and a
    module key in the model, so it may not be empty, hold a path separator or a dot (so neither
    `..` nor an absolute path), or a NUL. Raises ValueError naming it."""
    if not isinstance(name, str):
        raise ValueError(f"an adapter name must be a string (got {type(name).__name__}: {name!r})")
    bad = [c for c in ("/", "\\", ".", "\0") if c in name]
    if not name or bad:
        why = f"it holds {', '.join(repr(c) for c in bad)}" if bad else "it is empty"
        raise ValueError(f"adapter name {name!r} is not a plain name ({why}); it names a subfolder when saved, "
                         "so use letters, digits, '-' or '_'")
    return name


def adapter_folder(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    d = Path(save_directory)
    return d if adapter_name == "default" else d / check_adapter_name(adapter_name)


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
                 bias: str = "none", extra: dict[str, torch.Tensor] | None = None) -> None:
    """Copy saved tensors into the live adapter weights; every adapter key must match, both ways.

    A file may also hold base-model weights (PEFT saves the embedding matrices when an embedding
    is adapted); keys that name a parameter of the model are loaded into it, as PEFT does.
    """
    live = adapter_tensors(model, adapter_name, bias, extra)
    unexpected = sorted(set(tensors) - set(live))
    if unexpected:
        params = {PREFIX + n: p for n, p in model.named_parameters(remove_duplicate=False)}
        found = {k: _model_parameter(k, params, adapter_name) for k in unexpected}
        unexpected = [k for k, p in found.items() if p is None]
        # A trained bias saved under another name (`.base_layer.bias`) fills its parameter.
        filled = {id(p) for p in found.values() if p is not None}
        live = {k: t for k, t in live.items() if k in tensors or id(t) not in filled}
        live.update({k: p for k, p in found.items() if p is not None})
    missing = sorted(set(live) - set(tensors))
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


def _model_parameter(key: str, params: dict[str, nn.Parameter], adapter_name: str) -> nn.Parameter | None:
    """The model parameter a saved key names, beyond the adapter's own keys: a base weight (PEFT
    saves embedding matrices), or PEFT's names for trained base biases: `<module>.base_layer.bias`
    of a layer that another adapter wrapped when it was saved (plain `<module>.bias` here), and
    `<module>.modules_to_save.bias` / `<module>.original_module.bias` (bias='all' with modules_to_save)."""
    candidates = [key]
    if ".base_layer." in key:
        candidates.append(key.replace(".base_layer.", ".", 1))
    if ".modules_to_save." in key:
        candidates.append(key.replace(".modules_to_save.", f".modules_to_save.{adapter_name}.", 1))
    return next((params[c] for c in candidates if c in params), None)


def has_adapter(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and (
        (folder / WEIGHTS_NAME).is_file() or (folder / PICKLE_WEIGHTS_NAME).is_file()
    )
