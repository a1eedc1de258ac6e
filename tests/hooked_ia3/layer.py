"""IA3's layers, and hooks that add a loss term and record each optimizer step with its gradients."""

from __future__ import annotations

import torch

from peftctl.adapters.hooks import TrainingHooks
from peftctl.adapters.ia3.layer import IA3Layer, dispatch  # noqa: F401 (the method's dispatch)


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
