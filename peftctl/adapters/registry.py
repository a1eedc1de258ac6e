"""The adapter methods peftctl knows: one line each.

A method lives in its own package under `peftctl/adapters/` with two modules: `config` (a pydantic
config class, no torch) and `layer` (the torch layers and a `dispatch` function that picks the
layer class for a base module). Adding a method means adding its package and one line here
(docs/ARCHITECTURE.md, "How to add a method", says what each part provides).
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

# method name -> package. The package's `config` module defines CONFIG_CLASS, its `layer` module
# defines `dispatch(base_module, adapter_name, config, module_name)` and, optionally,
# `add_weighted_adapter(model, adapters, weights, adapter_name, **options)` and
# `training_hooks(model, adapter_name, config)` (see `optional`).
METHODS: dict[str, str] = {
    "lora": "peftctl.adapters.lora",
    "ia3": "peftctl.adapters.ia3",
    "loha": "peftctl.adapters.loha",
    "lokr": "peftctl.adapters.lokr",
    "adalora": "peftctl.adapters.adalora",
    "vera": "peftctl.adapters.vera",
    "prompt_tuning": "peftctl.adapters.prompt_tuning",
    "p_tuning": "peftctl.adapters.p_tuning",
    "prefix_tuning": "peftctl.adapters.prefix_tuning",
}


@cache
def config_class(method: str) -> type:
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; known: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[method] + ".config").CONFIG_CLASS


def config_classes() -> list[type]:
    return [config_class(m) for m in METHODS]


def layer_module(method: str):
    config_class(method)  # validates the name
    return importlib.import_module(METHODS[method] + ".layer")


def optional(method: str, name: str):
    """A function the method's `layer` module may define (None when it does not):
    `add_weighted_adapter` (PEFT's, for methods whose adapters combine) or `training_hooks` (what the
    method contributes to the training loop: `peftctl.adapters.hooks`)."""
    return getattr(layer_module(method), name, None)


def config_from_peft_dict(d: dict[str, Any]):
    """The config object for an adapter_config.json dict, whatever its `peft_type`."""
    peft_type = d.get("peft_type")
    for cls in config_classes():
        if cls.peft_type == peft_type:
            return cls.from_peft_dict(d)
    known = ", ".join(c.peft_type for c in config_classes())
    raise ValueError(f"unsupported peft_type {peft_type!r} (peftctl implements: {known})")
