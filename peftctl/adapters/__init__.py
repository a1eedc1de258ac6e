"""peftctl's adapter core. Importing this package is cheap: names load on first use."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterConfig": "peftctl.adapters.config",
    "TaskType": "peftctl.adapters.config",
    "LoraConfig": "peftctl.adapters.lora.config",
    "AdapterLayer": "peftctl.adapters.layer",
    "AdapterModel": "peftctl.adapters.model",
    "PeftModel": "peftctl.adapters.model",
    "get_peft_model": "peftctl.adapters.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attach(model, config, adapter_name: str = "default"):
    """Inject a new trainable adapter described by `config` into `model`."""
    from peftctl.adapters.model import get_peft_model

    return get_peft_model(model, config, adapter_name)
