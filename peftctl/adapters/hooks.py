"""What an adapter method may contribute to the training loop, without the loop knowing its name.

A method whose training needs more than the loss's gradient (AdaLoRA: an orthogonality penalty in
the loss, a rank budget reallocated after each step) defines, in its `layer` module,

    def training_hooks(model: AdapterModel, adapter_name: str, config) -> TrainingHooks | None

which `AdapterModel` calls once when the adapter is created. The training loop then asks the
model for the hooks of its active adapters (`AdapterModel.training_hooks()`, a `HookSet`) and:

- adds `loss_terms()` to the loss: the objective of each optimizer step is the mean loss per loss
  token plus the sum of the terms. The loop calls `loss_terms()` once per micro-batch, inside its
  forward and backward, and weights each micro-batch's terms by 1 / (micro-batches in the step), so
  a step adds each term once whatever the gradient accumulation (several processes: each adds it
  and their gradients are averaged, so terms must be the same on every process, as terms that
  depend on the replicated adapter weights are);
- calls `after_optimizer_step(step)` after each optimizer update it makes (not after a skipped
  one), before the gradients are zeroed: they are the step's full gradients (accumulated, and
  reduced over processes); `step` is the 1-based number of that step;
- calls `begin(total_steps)` once before its first step (a resumed run too), with the run's number
  of optimizer steps, and `end()` once after its last step, before the run's adapter is saved (not
  when the run stops early: the checkpoints hold the adapter as it trains);
- saves `state_dict()` in every checkpoint (`adapter_hooks.pt`, loaded with weights_only: tensors
  and plain values only) and gives it back with `load_state_dict(state)` when the run resumes, so a
  resumed run continues exactly.

Methods without such needs define nothing, and the loop does nothing for them.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainingHooks:
    """One adapter's contribution to training; every method is optional (the defaults do nothing)."""

    def begin(self, total_steps: int) -> None:
        """Before the loop's first step: the run makes `total_steps` optimizer steps in all.
        ValueError: the method cannot train for that many (the message says why)."""

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """{name: scalar tensor} added to the step's objective (see the module docstring)."""
        return {}

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer update number `step` (1-based), before gradients are zeroed."""

    def end(self) -> None:
        """After the run's last step, before its adapter is saved."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class HookSet:
    """The hooks of several adapters, called as one; false when there are none."""

    def __init__(self, hooks: dict[str, TrainingHooks]):
        self.hooks = dict(hooks)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """Every adapter's terms; named `<adapter>.<term>` when several adapters contribute."""
        out: dict[str, torch.Tensor] = {}
        for adapter, hooks in self.hooks.items():
            for key, value in hooks.loss_terms().items():
                out[key if len(self.hooks) == 1 else f"{adapter}.{key}"] = value
        return out

    def begin(self, total_steps: int) -> None:
        for hooks in self.hooks.values():
            hooks.begin(total_steps)

    def after_optimizer_step(self, step: int) -> None:
        for hooks in self.hooks.values():
            hooks.after_optimizer_step(step)

    def end(self) -> None:
        for hooks in self.hooks.values():
            hooks.end()

    def state_dict(self) -> dict[str, Any]:
        return {adapter: hooks.state_dict() for adapter, hooks in self.hooks.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore each adapter's state; ValueError when `state` is not for these adapters."""
        if not isinstance(state, dict) or set(state) != set(self.hooks):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"holds training state for adapters {have}, this model's are {sorted(self.hooks)}")
        for adapter, hooks in self.hooks.items():
            hooks.load_state_dict(state[adapter])
