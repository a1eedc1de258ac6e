"""The model wrappers: `AdapterModel` (injects a method's layers and manages adapters) and
`PeftModel` (PEFT's public API on top: save / load, trainable-parameter accounting, delegation).

The nesting mirrors PEFT's, `PeftModel.base_model.model` is the transformers model, so parameter
names and saved keys (`base_model.model.<module path>...`) are PEFT's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from peftctl.adapters import io
from peftctl.adapters.config import AdapterConfig
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.matching import ALL_LINEAR, find_targets
from peftctl.adapters.registry import layer_module


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class AdapterModel(nn.Module):
    """Holds the transformers model with adapter layers injected into it."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- adding and removing ------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: AdapterConfig) -> list[str]:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        methods = {c.method for c in self.peft_config.values()}
        if methods and config.method not in methods:
            raise ValueError(
                f"this model holds {', '.join(methods)} adapters; a {config.method} adapter cannot be added to it"
            )
        layers = layer_module(config.method)
        names = find_targets(self.model, config)
        for name in names:
            parent, attr = _parent(self.model, name)
            module = getattr(parent, attr)
            if isinstance(module, AdapterLayer):
                module.update_layer(adapter_name, config)
            else:
                setattr(parent, attr, layers.dispatch(module, adapter_name, config, name))
        if config.target_modules == ALL_LINEAR:
            # Saved as the explicit module list, as PEFT does: readers such as vLLM match names.
            config = config.model_copy(update={"target_modules": sorted(names)})
        self.peft_config[adapter_name] = config
        # A new adapter starts frozen unless it is (or becomes) active and trainable.
        for layer in self.adapter_layers():
            layer.set_adapter(self.active_adapters or [adapter_name], trainable=self._trainable())
        return names

    def adapter_layers(self) -> Iterator[AdapterLayer]:
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                yield module

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    # ---- activation -----------------------------------------------------------------------------
    def _trainable(self, names: list[str] | None = None) -> bool:
        names = self.active_adapters if names is None else names
        return not any(self.peft_config[n].inference_mode for n in names if n in self.peft_config)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; adapters: {', '.join(self.peft_config)}")
        self.active_adapters = names
        trainable = not inference_mode and self._trainable(names)
        for layer in self.adapter_layers():
            layer.set_adapter(names, trainable=trainable)

    def _set_enabled(self, enabled: bool) -> None:
        for layer in self.adapter_layers():
            layer.disable_adapters = not enabled

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        self._set_enabled(False)

    # ---- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for layer in self.adapter_layers():
            layer.merge(adapter_names or self.active_adapters, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        for name, module in list(self.model.named_modules()):
            if not isinstance(module, AdapterLayer):
                continue
            if merge:
                module.merge(adapter_names or self.active_adapters, safe_merge=safe_merge)
            parent, attr = _parent(self.model, name)
            setattr(parent, attr, module.get_base_layer())
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active adapters into the base weights and return the plain model."""
        return self._unwrap(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging: the base model as it was."""
        self.unmerge_adapter()
        return self._unwrap(False)


class PeftModel(nn.Module):
    """PEFT's `PeftModel`, over peftctl's adapter core."""

    def __init__(self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", **kwargs):
        super().__init__()
        self.base_model = AdapterModel(model, peft_config, adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- what the wrapper is ------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.base_model.active_adapters
        return active[0] if len(active) == 1 else list(active)

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.base_model.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.model.generate(*args, **kwargs)

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this context; the adapters come back after it."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---- parameter accounting -----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
                n *= 2  # 4-bit weights pack two values per stored byte
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- saving and loading -------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        if not safe_serialization:
            raise ValueError("peftctl writes adapter weights as safetensors only")
        if not is_main_process:
            return
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}")
            folder = io.adapter_folder(save_directory, name)
            folder.mkdir(parents=True, exist_ok=True)
            io.save_weights(self.base_model.model, name, folder)
            config = self.peft_config[name].model_copy(update={"inference_mode": True})
            if config.base_model_name_or_path is None:
                config = config.model_copy(
                    update={"base_model_name_or_path": getattr(self.base_model.model, "name_or_path", None) or None}
                )
            config.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        subfolder: str | None = None, allow_pickle: bool = False, **kwargs: Any) -> PeftModel:
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        config = _load_config(folder, config, is_trainable)
        peft_model = cls(model, config, adapter_name)
        io.load_weights(peft_model.base_model.model, adapter_name,
                        io.read_weights(folder, allow_pickle=allow_pickle), str(folder))
        peft_model.set_adapter(adapter_name)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, allow_pickle: bool = False, **kwargs: Any) -> None:
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        config = _load_config(folder, None, is_trainable)
        self.add_adapter(adapter_name, config)
        io.load_weights(self.base_model.model, adapter_name,
                        io.read_weights(folder, allow_pickle=allow_pickle), str(folder))


def _load_config(folder: Path, config: AdapterConfig | None, is_trainable: bool) -> AdapterConfig:
    if config is None:
        config = AdapterConfig.from_pretrained(folder)
    return config.model_copy(update={"inference_mode": not is_trainable})


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default",
                   **kwargs: Any) -> PeftModel:
    """Wrap `model` with a new, trainable adapter (PEFT's function of the same name)."""
    return PeftModel(model, peft_config.model_copy(update={"inference_mode": False}), adapter_name)
