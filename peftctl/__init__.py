"""peftctl: parameter-efficient fine-tuning driven by YAML recipes, with PEFT's Python API.

`from peftctl import LoraConfig, get_peft_model, PeftModel` works like PEFT's imports. Names load
on first use, so importing peftctl (and `peftctl --help`) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "peftctl.adapters.config",
    "TaskType": "peftctl.adapters.config",
    "LoraConfig": "peftctl.adapters.lora.config",
    "PeftModel": "peftctl.adapters.model",
    "get_peft_model": "peftctl.adapters.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
