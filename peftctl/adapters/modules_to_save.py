"""`modules_to_save`: whole modules (a classification head, `lm_head`) trained in full with an adapter.

Each adapter gets its own copy of the module; the original stays frozen and is what the base model
(adapters disabled, or an adapter without this module) uses. Saved keys are PEFT's: the copy's
parameters under the module's own path (`base_model.model.score.weight`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.training = module.training  # the wrapper takes the wrapped module's mode
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        # Per-row adapter names for a mixed batch (set by the model for one forward, else None).
        self.batch_adapter_names: list[str] | None = None
        self.original_module.requires_grad_(False)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(False)
        self.modules_to_save.train(self.training)  # the model's current mode

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def set_adapter(self, adapter_names: list[str], trainable: bool) -> None:
        present = [n for n in adapter_names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"adapters {present} each train their own copy of the same module (modules_to_save); "
                "only one of them can be active at a time"
            )
        self.active_adapter = present[0] if present else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The saved tensors, keyed relative to this module's path (the adapter's copy's own names)."""
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].named_parameters())

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        names = self.batch_adapter_names
        if names is None or self.disable_adapters:
            return self.active_module(*args, **kwargs)
        x, args = args[0], args[1:]
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} rows")
        out = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((len(names), *part.shape[1:]))
            out[rows] = part
        return out

    def __getattr__(self, name: str):
        # Code that reads `lm_head.weight` or `score.out_features` sees the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise  # not built yet: no recursion
            return getattr(self.active_module, name)


# ---- combining adapters (add_weighted_adapter) ------------------------------------------------------


def check_combinable_copies(model, adapters: list[str]) -> None:
    """Adapters that each train their own copy of one module cannot be combined (PEFT's rule):
    ValueError. `model`: the AdapterModel."""
    for wrapper in model.wrappers():
        if isinstance(wrapper, ModulesToSaveWrapper) and sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise ValueError("adapters that each train their own copy of the same module (modules_to_save) "
                             "cannot be combined")


def start_from_source_copies(model, adapters: list[str], adapter_name: str) -> None:
    """A module one of `adapters` trained in full: the new adapter's copy starts from that trained
    copy (PEFT starts from the base module, which would lose what was trained)."""
    for wrapper in model.wrappers():
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
            source = next((a for a in adapters if a in wrapper.modules_to_save), None)
            if source is not None:
                wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
