"""AdaLoRA's layers (`AdaLoraLayer`: `Linear`, `Conv2d`, bitsandbytes' quantized linears), which
class wraps which base module (`dispatch`), and what AdaLoRA adds to training (`AdaLoraHooks`:
the orthogonal regularisation, the sensitivity averages and the budget schedule, PEFT's
`RankAllocator` and `AdaLoraModel.update_and_allocate`).

Per adapter, shaped and named as PEFT saves them: `lora_A` (Q, r x in; for Conv2d r x in*kh*kw),
`lora_E` (Λ, r x 1), `lora_B` (P, out x r), float32 on the base weight's device; `ranknum`, a
frozen parameter holding init_r (not saved, as in PEFT), divides the update. The forward adds
(dropout(x) @ (Q ⊙ Λ)ᵀ @ Pᵀ) * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when
lora_alpha is 0), in the activations' dtype (the adapter weights are cast down; PEFT casts the
activations up), the same operations in the same order as PEFT, so float32 results are PEFT's bit
for bit. Merging adds P (Q ⊙ Λ) * scaling / (ranknum + 1e-5) to the weight (transposed for Conv1D,
reshaped for Conv2d).

Training keeps every layer at init_r triplets and zeroes the pruned ones' Λ (PEFT's masking); when
training ends (`AdaLoraHooks.end`), the layers keep only the surviving triplets and the config
records them as `rank_pattern`, so the saved adapter is PEFT's (a layer loaded from such a file has
that many triplets and ranknum init_r, as PEFT resizes it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftctl.adapters.adalora.config import check_schedule
from peftctl.adapters.hooks import TrainingHooks
from peftctl.adapters.layer import AdapterLayer, LayerTypes, compute_dtype
from peftctl.bnb import keep_plain_layout


class AdaLoraLayer(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "init_r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.init_r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        # init_r as a frozen float32 parameter (PEFT's `ranknum`): counted in the model's parameters
        # as PEFT counts it, never trained nor saved.
        self.ranknum = nn.ParameterDict()

    def a_columns(self) -> int:
        """lora_A's second dimension."""
        return self.in_features

    # ---- creating an adapter --------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        rank = config.init_r
        mask = module_mask(config.rank_pattern, module_name, adapter_name)
        if mask is not None:  # a saved adapter: only its surviving triplets (PEFT's resize on load)
            rank = sum(bool(m) for m in mask)
        self.r[adapter_name] = rank
        self.init_r[adapter_name] = config.init_r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(rank)
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        weight = self.get_base_layer().weight
        if weight.device.type == "meta":
            a = torch.empty(rank, self.a_columns(), device="meta")
            e = torch.empty(rank, 1, device="meta")
            b = torch.empty(self.out_features, rank, device="meta")
        else:
            # PEFT's order of random draws (A, E, B, ranknum's placeholder, then the init), so that a
            # seed gives PEFT's weights.
            a = torch.randn(rank, self.a_columns())
            e = torch.randn(rank, 1)
            b = torch.randn(self.out_features, rank)
            torch.randn(1)
            if config.init_lora_weights:
                nn.init.zeros_(e)
                nn.init.normal_(a, mean=0.0, std=0.02)
                nn.init.normal_(b, mean=0.0, std=0.02)
            a, e, b = (t.to(weight.device) for t in (a, e, b))
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_E[adapter_name] = nn.Parameter(e)
        self.lora_B[adapter_name] = nn.Parameter(b)
        # ranknum stays init_r when the rank is cut (PEFT copies it back after resizing).
        self.ranknum[adapter_name] = nn.Parameter(
            torch.full((1,), float(config.init_r), device=weight.device), requires_grad=False)
        self.set_adapter(self.active_adapters, trainable=False)
        self.match_mode(adapter_name)

    def keep_triplets(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Keep only the triplets where `mask` (bool, r) is true: new, smaller lora_A / lora_E / lora_B
        parameters with those rows (training has ended: an optimizer holds the old ones)."""
        idx = mask.nonzero().flatten().to(self.lora_A[adapter_name].device)
        trainable = self.lora_A[adapter_name].requires_grad
        with torch.no_grad():
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                container = getattr(self, attr)
                container[adapter_name] = nn.Parameter(container[adapter_name].index_select(dim, idx).clone(),
                                                       requires_grad=trainable)
        self.r[adapter_name] = int(idx.numel())

    # ---- forward ------------------------------------------------------------------------------------
    def dropout(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        drop = self.lora_dropout[adapter_name]
        return x if isinstance(drop, nn.Identity) else drop(x)

    def divisor(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        return (self.ranknum[adapter_name] + 1e-5).to(dtype)

    def adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            raise ValueError("AdaLoRA layers take no adapter_names (a mixed batch): PEFT mixes adapters per row "
                             "for LoRA only; run one adapter at a time (set_adapter)")
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            result = result + self.adapter_delta(name, x).to(result.dtype)
        return result

    # ---- what inspect and the memory estimate read ----------------------------------------------
    def describe(self, adapter_name: str) -> str:
        if adapter_name not in self.r:
            return ""
        return f"r={self.r[adapter_name]} of init_r={self.init_r[adapter_name]}"

    def saved_activations(self) -> tuple[bool, int]:
        return True, sum(self.r.values())  # the input (Q's gradient) and the r-wide intermediates

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()


class Linear(AdaLoraLayer):
    """AdaLoRA over `nn.Linear` and transformers' `Conv1D` (weight stored (in, out): fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = not isinstance(base, nn.Linear) and type(base).__name__ == "Conv1D"
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.update_layer(adapter_name, config, module_name=module_name)

    def adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        h = self.dropout(adapter_name, x).to(dtype) @ (a * e).T.to(dtype) @ b.T.to(dtype)
        return h * self.scaling[adapter_name] / self.divisor(adapter_name, dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, e, b = (getattr(self, n)[adapter_name].detach().float() for n in ("lora_A", "lora_E", "lora_B"))
        delta = b @ (a * e)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta * self.scaling[adapter_name] / self.divisor(adapter_name, torch.float32)


class Conv2d(AdaLoraLayer):
    """AdaLoRA over `nn.Conv2d` (groups 1, as PEFT's SVDConv2d): Q is r x (in_channels * kh * kw) and
    the update P (Q ⊙ Λ) is reshaped to the kernel's shape and convolved like the base."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer)
        base = self.get_base_layer()
        if base.groups != 1:
            raise TypeError(f"module {module_name} is a grouped Conv2d (groups={base.groups}); AdaLoRA (as PEFT's "
                            "SVDConv2d) adapts ungrouped convolutions only")
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.update_layer(adapter_name, config, module_name=module_name)

    def a_columns(self) -> int:
        kh, kw = self.get_base_layer().kernel_size
        return self.in_features * kh * kw

    def _kernel(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        w = b.to(dtype) @ (a * e).to(dtype) * self.scaling[adapter_name] / self.divisor(adapter_name, dtype)
        return w.reshape(self.get_base_layer().weight.shape)

    def adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        dtype = compute_dtype(x)
        return nn.functional.conv2d(self.dropout(adapter_name, x).to(dtype), self._kernel(adapter_name, dtype),
                                    stride=base.stride, padding=base.padding, dilation=base.dilation,
                                    groups=base.groups)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return self._kernel(adapter_name, torch.float32).detach()


class QuantizedLinear(Linear):
    """AdaLoRA over bitsandbytes' `Linear4bit` and `Linear8bitLt` (PEFT's SVDLinear4bit and
    SVDLinear8bitLt): `Linear`'s forward around the quantized layer's; merging is refused (PEFT's
    quantized AdaLoRA layers cannot merge either)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        keep_plain_layout(base_layer, module_name)
        super().__init__(base_layer, adapter_name, config, module_name=module_name)

    def base_params(self) -> dict[str, torch.Tensor]:
        raise ValueError(f"merging an AdaLoRA adapter into a quantized {type(self.get_base_layer()).__name__} weight "
                         "is refused (PEFT cannot either): merge into the base model loaded in its original precision")


# ---- dispatch: which layer class wraps which base module ----------------------------------------


def _builtin_types() -> list[tuple[type, type[AdaLoraLayer]]]:
    from transformers.pytorch_utils import Conv1D

    # PEFT's AdaLoRA adapts these (not embeddings nor other convolutions).
    return [(nn.Conv2d, Conv2d), (nn.Linear, Linear), (Conv1D, Linear)]


def _quantized_types() -> list[tuple[type, type[AdaLoraLayer]]]:
    import bitsandbytes as bnb

    return [(bnb.nn.Linear4bit, QuantizedLinear), (bnb.nn.Linear8bitLt, QuantizedLinear)]


LAYER_TYPES = LayerTypes("AdaLoRA", _builtin_types, _quantized_types)
dispatch = LAYER_TYPES.dispatch


def module_mask(rank_pattern: dict[str, list[bool]] | None, module_name: str, adapter_name: str) -> list[bool] | None:
    """The saved mask of one module: PEFT's key `<module path>.lora_E` (as saved) or
    `<module path>.lora_E.<adapter>` (as PEFT keeps it in memory); None when absent."""
    if not rank_pattern:
        return None
    for key in (f"{module_name}.lora_E", f"{module_name}.lora_E.{adapter_name}"):
        if key in rank_pattern:
            return rank_pattern[key]
    return None


def before_inject(model, adapter_name: str, config, targets: list[str]) -> None:
    """PEFT's rule: one AdaLoRA adapter of a model trains; the others must be in inference mode."""
    if config.inference_mode:
        return None
    training = [n for n, c in model.peft_config.items() if c.method == "adalora" and not c.inference_mode]
    if training:
        raise ValueError(f"AdaLoRA trains one adapter per model and {training[0]!r} is not in inference mode; "
                         f"add {adapter_name!r} with inference_mode=True (as PEFT requires)")
    return None


# ---- training: PEFT's RankAllocator and AdaLoraModel.update_and_allocate -------------------------


class AdaLoraHooks(TrainingHooks):
    """AdaLoRA's training, through the loop's method-agnostic hooks (`peftctl.adapters.hooks`), as PEFT
    computes it (Zhang et al. 2023; PEFT's `RankAllocator`, `AdaLoraModel.forward` and
    `update_and_allocate`):

    - `loss_terms`: {"orth_reg": orth_reg_weight * mean over the adapted Q and P of ||Q Qᵀ - I||_F
      and ||Pᵀ P - I||_F} (eq. 4);
    - `after_optimizer_step(t)`: while t < total_step - tfinal, the sensitivity I = |w ⊙ ∂L/∂w| of
      every entry of P, Λ, Q (from the step's full, accumulated and process-reduced gradients) updates
      the averages Ī ← β1 Ī + (1 - β1) I and Ū ← β2 Ū + (1 - β2) |I - Ī| (eqs. 8-9); at the allocation
      steps (t a multiple of deltaT after tinit) the score of triplet i, S_i = s(Λ_i) + mean_j s(P_ji)
      + mean_j s(Q_ij) with s = Ī ⊙ Ū (eqs. 7, 10), keeps the budget b(t) best triplets over all
      modules and zeroes the others' Λ (eq. 6); the budget falls from init_r x modules at tinit to
      target_r x modules at total_step - tfinal as b(t) = int((b0 - bT) (1 - (t - tinit) /
      (total_step - tfinal - tinit))³ + bT) (eq. 12); at t = total_step - tfinal the final masks are
      made and the averages dropped; after it the final masks are applied again after every step;
    - `end()`: the layers keep only their surviving triplets and the config records them as
      `rank_pattern` (PEFT's saved form).

    State (checkpoints): the averages and the current masks. Unlike PEFT, a budget equal to the whole
    initial budget at an allocation step prunes nothing (PEFT's `kthvalue` fails with k = 0).
    """

    def __init__(self, model, adapter_name: str):
        self.model, self.adapter_name = model, adapter_name
        self.layers: list[tuple[str, AdaLoraLayer]] = [
            (path, m) for path, m in model.model.named_modules()
            if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A]
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] | None = None  # module path -> bool (r,): the last allocation
        self.run_steps: int | None = None  # the run's optimizer steps (`begin`)
        self.ended = False

    @property
    def config(self):
        return self.model.peft_config[self.adapter_name]

    def _tensors(self):
        """(key, parameter) for each adapted layer's Λ, Q, P; key `<module path>.lora_E` etc."""
        for path, layer in self.layers:
            for attr in ("lora_E", "lora_A", "lora_B"):
                yield f"{path}.{attr}", getattr(layer, attr)[self.adapter_name]

    def total_step(self) -> int:
        total = self.config.total_step
        if total is None:
            raise ValueError("AdaLoRA's total_step is unset: set it in the config, or call begin(total_steps) "
                             "first (a peftctl run does, with its number of optimizer steps)")
        return total

    # ---- the loop's hooks ---------------------------------------------------------------------------
    def begin(self, total_steps: int) -> None:
        """total_step unset (or set by an earlier `begin`): the run's `total_steps`, recorded in the
        config. ValueError when the schedule then leaves no budgeting phase."""
        if self.config.total_step is None or self.run_steps == self.config.total_step:
            check_schedule(self.config.tinit, self.config.tfinal, total_steps)
            self.model.peft_config[self.adapter_name] = self.config.model_copy(update={"total_step": total_steps})
        self.run_steps = total_steps

    def loss_terms(self) -> dict[str, torch.Tensor]:
        weight = self.config.orth_reg_weight
        if weight == 0 or not self.layers:
            return {}
        # PEFT's sum: per layer in model order, Q then P; ||Q Qᵀ - I||_F, ||Pᵀ P - I||_F.
        total: Any = 0
        count = 0
        for _, layer in self.layers:
            a, b = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return {"orth_reg": weight * (total / count)}

    def after_optimizer_step(self, step: int) -> None:
        if self.ended:
            raise ValueError("AdaLoRA's training has ended (end() kept the surviving triplets only)")
        total, tfinal = self.total_step(), self.config.tfinal
        if step < total - tfinal:
            self._update_averages()
            budget, allocate = self.budget(step)
            if allocate:
                self._mask_to_budget(budget)
        elif step == total - tfinal:
            budget, _ = self.budget(step)
            self._mask_to_budget(budget)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.masks is not None:
            self._apply_masks()

    def end(self) -> None:
        """Keep only the surviving triplets of the last allocation and record them as `rank_pattern`
        (nothing changes when no allocation was made)."""
        if self.ended or self.masks is None:
            self.ended = True
            return
        pattern = {f"{path}.lora_E": self.masks[path].tolist() for path, _ in self.layers}
        for path, layer in self.layers:
            layer.keep_triplets(self.adapter_name, self.masks[path])
        self.model.peft_config[self.adapter_name] = self.config.model_copy(update={"rank_pattern": pattern})
        self.ended = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "exp_avg_ipt": {k: v.clone() for k, v in self.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.clone() for k, v in self.exp_avg_unc.items()},
            "masks": None if self.masks is None else {k: v.clone() for k, v in self.masks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {k for k, _ in self._tensors()}
        paths = {p for p, _ in self.layers}
        if set(state.get("exp_avg_ipt", {})) - keys or (state.get("masks") and set(state["masks"]) != paths):
            raise ValueError("holds AdaLoRA state for other modules than this adapter's")
        device = {k: t.device for k, t in self._tensors()}
        self.exp_avg_ipt = {k: v.to(device[k]) for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: v.to(device[k]) for k, v in state["exp_avg_unc"].items()}
        masks = state.get("masks")
        self.masks = None if masks is None else {
            p: m.to(device[f"{p}.lora_E"]) for p, m in masks.items()}

    # ---- PEFT's RankAllocator -----------------------------------------------------------------------
    def budget(self, step: int) -> tuple[int, bool]:
        """(budget: triplets kept over all modules at `step`, whether `step` allocates): PEFT's
        `budget_schedule`, the cubic schedule of Zhang et al. 2023, eq. 12."""
        cfg = self.config
        init_bgt = sum(layer.lora_A[self.adapter_name].size(0) for _, layer in self.layers)
        target_bgt = cfg.target_r * len(self.layers)
        total = self.total_step()
        if step <= cfg.tinit:
            return init_bgt, False
        if step > total - cfg.tfinal:
            return target_bgt, True
        mul_coeff = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
        return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % cfg.deltaT == 0

    def _update_averages(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for key, p in self._tensors():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                ipt = (p * grad).abs().detach()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
                self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - self.exp_avg_ipt[key]).abs()

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(like)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def _mask_to_budget(self, budget: int) -> None:
        scores: dict[str, torch.Tensor] = {}
        for path, layer in self.layers:
            a, e, b = (getattr(layer, n)[self.adapter_name] for n in ("lora_A", "lora_E", "lora_B"))
            ipt_a = torch.mean(self._score(f"{path}.lora_A", a), dim=1, keepdim=True)
            ipt_b = torch.mean(self._score(f"{path}.lora_B", b), dim=0, keepdim=False).view(-1, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            scores[path] = (self._score(f"{path}.lora_E", e).view(-1) + ipt_ab.view(-1)).view(-1, 1)
        init_bgt = sum(s.numel() for s in scores.values())
        k = init_bgt - budget
        masks = {}
        with torch.no_grad():
            if k <= 0:
                masks = {path: torch.ones(s.numel(), dtype=torch.bool, device=s.device) for path, s in scores.items()}
            else:
                threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=k)[0].item()
                for path, layer in self.layers:
                    pruned = scores[path] <= threshold
                    layer.lora_E[self.adapter_name].masked_fill_(pruned, 0.0)
                    masks[path] = (~pruned).view(-1)
        self.masks = masks

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for path, layer in self.layers:
                layer.lora_E[self.adapter_name].masked_fill_(~self.masks[path].unsqueeze(-1), 0.0)


def training_hooks(model, adapter_name: str, config) -> AdaLoraHooks | None:
    """The allocator of a trainable adapter that still has all its triplets (none in inference mode,
    nor for a saved adapter already cut to its `rank_pattern`, which trains as it is)."""
    if config.inference_mode or config.rank_pattern is not None:
        return None
    return AdaLoraHooks(model, adapter_name)
