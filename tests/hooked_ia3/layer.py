"""IA3's layers with what a method may add through the shared plumbing: training hooks (a loss term,
an action after each step, their state in checkpoints) and state outside the layers (made before the
layers by `before_inject`, handed to each layer, saved and loaded under its own key)."""

from __future__ import annotations

import torch
from torch import nn

from peftctl.adapters.hooks import TrainingHooks
from peftctl.adapters.ia3.layer import IA3Layer, Linear
from peftctl.adapters.layer import LayerTypes


class Shared(nn.Module):
    """A frozen random vector kept once per adapter (as VeRA keeps its shared projections)."""

    def __init__(self, targets: list[str]):
        super().__init__()
        self.targets = list(targets)
        self.register_buffer("gain", torch.rand(4))


class SharedLinear(Linear):
    """IA3's Linear that also records the method's model-level state it was given."""

    def __init__(self, base_layer, adapter_name: str, config, module_name: str = "", state=None):
        super().__init__(base_layer, adapter_name, config, module_name=module_name)
        self.states = {adapter_name: state}

    def update_layer(self, adapter_name: str, config, module_name: str = "", state=None) -> None:
        super().update_layer(adapter_name, config, module_name=module_name)
        if hasattr(self, "states"):
            self.states[adapter_name] = state


dispatch = LayerTypes("IA3 (hooked)", lambda: [(nn.Linear, SharedLinear)]).dispatch


def before_inject(model, adapter_name: str, config, targets: list[str]) -> Shared:
    return Shared(targets)


def model_tensors(model, adapter_name: str) -> dict[str, torch.Tensor]:
    return {"base_model.hooked_gain": model.method_state[adapter_name].gain}


class PullHooks(TrainingHooks):
    def __init__(self, model, adapter_name: str, pull: float):
        self.vectors = [layer.ia3_l[adapter_name] for layer in model.adapter_layers()
                        if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l]
        self.pull = pull
        self.steps: list[int] = []  # the steps after_optimizer_step saw
        self.grad_sq = torch.zeros((), dtype=torch.float64)  # sum over steps of |gradient|^2 it saw

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return {"pull": self.pull * sum(((v - 1) ** 2).sum() for v in self.vectors)}

    def after_optimizer_step(self, step: int) -> None:
        self.steps.append(step)
        self.grad_sq = self.grad_sq + sum((v.grad.double() ** 2).sum() for v in self.vectors)

    def state_dict(self):
        return {"steps": list(self.steps), "grad_sq": self.grad_sq.clone()}

    def load_state_dict(self, state) -> None:
        self.steps, self.grad_sq = list(state["steps"]), state["grad_sq"].clone()


def training_hooks(model, adapter_name: str, config) -> PullHooks:
    return PullHooks(model, adapter_name, config.pull)
