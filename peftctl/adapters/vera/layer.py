"""VeRA layers: the shared projections (`Projections`, made by `before_inject` and saved by
`model_tensors`), the layer classes, and which class wraps which base module (`dispatch`).

Per adapter the model holds one pair of frozen float32 projections, drawn from the config's
`projection_prng_key` (a CPU `torch.Generator`; A (r x in_max) then B (out_max x r), each Kaiming
uniform, bound sqrt(6 / fan_in): PEFT's `_kaiming_init`), sized for the largest adapted layer; every
layer uses their top-left corner A[:, :in], B[:out]. Per layer and adapter two trained float32
vectors, shaped as PEFT saves them: `vera_lambda_d` (r), `vera_lambda_b` (out). The forward adds

    b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x))))          (Kopiczko et al. 2024, eq. 1)

to the base output, in the activations' dtype (the projections and vectors are cast down, the
activations never upcast); merging adds (b B[:out]) (d A[:, :in]) (transposed for Conv1D) to W.

Several adapters on one model, as PEFT: every one uses the same `projection_prng_key` and the same
`save_projection`; a later adapter starts from a copy of the first one's projections (so it needs the
same rank and no larger layers), not from a new draw. A file whose projections are larger than its
layers need (a later adapter's) loads on its own (`before_load`; PEFT refuses it).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.layer import AdapterLayer, LayerTypes, compute_dtype
from peftctl.bnb import keep_plain_layout


class Projections(nn.Module):
    """One adapter's frozen projections: buffers `vera_A` (r x in_max) and `vera_B` (out_max x r)."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A)
        self.register_buffer("vera_B", vera_B)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), fan_in = shape[1], drawn from `generator` (float32, CPU):
    PEFT's `_kaiming_init` (He et al. 2015 with gain sqrt(2))."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraLayer(AdapterLayer):
    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("vera_dropout", "r", "projections")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "",
                 state: Projections | None = None):
        super().__init__(base_layer)
        base = self.get_base_layer()
        # transformers' Conv1D computes x @ W + b with W stored (in, out): PEFT's fan_in_fan_out.
        self.fan_in_fan_out = not isinstance(base, nn.Linear) and type(base).__name__ == "Conv1D"
        self.in_features, self.out_features = in_out_features(base)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        # The model's projections for each adapter (owned by `AdapterModel.method_state`, not by the layer).
        self.projections: dict[str, Projections] = {}
        self.update_layer(adapter_name, config, module_name=module_name, state=state)

    # ---- creating an adapter ----------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, module_name: str = "", state: Projections | None = None) -> None:
        if state is None:
            raise ValueError(f"{module_name or 'this layer'}: a VeRA layer needs the model's shared projections "
                             "(made by the model when the adapter is added)")
        r = config.r
        if state.vera_A.shape[0] < r or state.vera_A.shape[1] < self.in_features \
                or state.vera_B.shape[0] < self.out_features:
            raise ValueError(f"{module_name}: the shared projections A {tuple(state.vera_A.shape)} and B "
                             f"{tuple(state.vera_B.shape)} are too small for r={r}, {self.in_features} inputs and "
                             f"{self.out_features} outputs")
        weight = self.get_base_layer().weight
        if weight.device.type == "meta":
            lambda_b = torch.empty(self.out_features, device="meta")
            lambda_d = torch.empty(r, device="meta")
        else:
            # PEFT's order: b = ones (no draw), d = randn(r) drawn whatever the init, so a seed gives its d.
            lambda_b = torch.ones(self.out_features)
            lambda_d = torch.randn(r)
            if config.init_weights:
                lambda_d.fill_(config.d_initial)
                lambda_b.zero_()
            lambda_b, lambda_d = lambda_b.to(weight.device), lambda_d.to(weight.device)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        p = config.vera_dropout
        self.vera_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.projections[adapter_name] = state
        self.set_adapter(self.active_adapters, trainable=False)
        self.match_mode(adapter_name)

    # ---- forward ------------------------------------------------------------------------------------
    def vera_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x)))) in the compute dtype (PEFT's order of operations)."""
        dtype = compute_dtype(x)
        proj = self.projections[adapter_name]
        a = proj.vera_A[:, : self.in_features].to(dtype)
        b_proj = proj.vera_B[: self.out_features, :].to(dtype)
        drop = self.vera_dropout[adapter_name]
        if not isinstance(drop, nn.Identity):
            x = drop(x)
        h = self.vera_lambda_d[adapter_name].to(dtype) * F.linear(x.to(dtype), a)
        return self.vera_lambda_b[adapter_name].to(dtype) * F.linear(h, b_proj)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            raise ValueError("VeRA layers take no adapter_names (a mixed batch): PEFT does not mix VeRA adapters "
                             "per row either")
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            result = result + self.vera_delta(name, x).to(result.dtype)
        return result

    # ---- merging ------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(b B[:out]) (d A[:, :in]) in float32, (out, in), transposed to (in, out) for Conv1D."""
        proj = self.projections[adapter_name]
        b = self.vera_lambda_b[adapter_name].detach().float().unsqueeze(-1)
        d = self.vera_lambda_d[adapter_name].detach().float().unsqueeze(-1)
        a = proj.vera_A[:, : self.in_features].float()
        b_proj = proj.vera_B[: self.out_features, :].float()
        delta = (b * b_proj) @ (d * a)
        return delta.T if self.fan_in_fan_out else delta

    # ---- what inspect and the memory estimate read ----------------------------------------------
    def describe(self, adapter_name: str) -> str:
        return f"r={self.r[adapter_name]}" if adapter_name in self.r else ""

    def saved_activations(self) -> tuple[bool, int]:
        # A and B are frozen, so the input is not kept for them; d's gradient needs A x (r per token),
        # b's needs B (d ⊙ A x) (out per token).
        return False, sum(r + self.out_features for r in self.r.values())

    def __repr__(self) -> str:
        return "vera." + super().__repr__()


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer, of GPT-2's Conv1D (weight stored (in, out)) or of bitsandbytes' linears."""
    if not isinstance(base, nn.Linear) and type(base).__name__ == "Conv1D":
        return tuple(base.weight.shape)
    return base.in_features, base.out_features


class Linear(VeraLayer):
    """VeRA over `nn.Linear` and transformers' `Conv1D`."""


class QuantizedLinear(VeraLayer):
    """VeRA over bitsandbytes' `Linear4bit` and `Linear8bitLt`: the forward is `Linear`'s around the
    quantized layer's; the 4-bit base stays in bitsandbytes' plain CPU layout (`peftctl.bnb`); merging
    into the quantized weight is refused (`AdapterLayer.base_params`), as in PEFT."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "",
                 state: Projections | None = None):
        keep_plain_layout(base_layer, module_name)
        super().__init__(base_layer, adapter_name, config, module_name=module_name, state=state)


# ---- dispatch: which layer class wraps which base module ----------------------------------------


def _builtin_types() -> list[tuple[type, type[VeraLayer]]]:
    from transformers.pytorch_utils import Conv1D

    return [(nn.Linear, Linear), (Conv1D, Linear)]  # PEFT's VeRA adapts these (and quantized linears) only


def _quantized_types() -> list[tuple[type, type[VeraLayer]]]:
    import bitsandbytes as bnb

    return [(bnb.nn.Linear4bit, QuantizedLinear), (bnb.nn.Linear8bitLt, QuantizedLinear)]


LAYER_TYPES = LayerTypes("VeRA", _builtin_types, _quantized_types)
dispatch = LAYER_TYPES.dispatch


# ---- the shared projections: made before the layers, saved with them ----------------------------


def before_inject(model, adapter_name: str, config, targets: list[str]) -> Projections:
    """The adapter's projections, sized for the largest of `targets` that VeRA can adapt (PEFT's
    `_find_dim`; the others fail in `dispatch`): drawn from `projection_prng_key` for the model's first
    VeRA adapter, a copy of an existing adapter's otherwise (PEFT's rule: they share one pair).
    ValueError: no target VeRA can adapt, or, for a later adapter, another `projection_prng_key`,
    `save_projection` or rank, or a layer larger than the existing projections."""
    types = tuple(t for t, _ in LAYER_TYPES.entries())
    shapes, device = [], None
    for name in targets:
        module = model.model.get_submodule(name)
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if isinstance(base, types):
            shapes.append(in_out_features(base))
            device = device or base.weight.device
    if not shapes:
        raise ValueError("No layers types compatible with VeRA were found. Please check `peft_config.target_modules`.")
    in_max, out_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    others = {n: c for n, c in model.peft_config.items() if n != adapter_name}
    for name, other in others.items():
        if other.projection_prng_key != config.projection_prng_key:
            raise ValueError(f"VeRA adapters on one model share their projections, so they need the same "
                             f"projection_prng_key: {adapter_name!r} has {config.projection_prng_key}, {name!r} has "
                             f"{other.projection_prng_key}")
        if other.save_projection != config.save_projection:
            raise ValueError(f"VeRA adapters on one model save their projections all or none: {adapter_name!r} has "
                             f"save_projection={config.save_projection}, {name!r} has {other.save_projection}")
    existing = [model.method_state[n] for n in others if n in model.method_state]
    if existing:
        first = existing[0]
        rows, cols = first.vera_A.shape
        if rows != config.r or cols < in_max or first.vera_B.shape[0] < out_max:
            # PEFT refuses larger layers or rank too, and fails in the forward for a smaller rank.
            raise ValueError(
                f"adapter {adapter_name!r} (r={config.r}, layers up to {in_max} inputs and {out_max} outputs) does not "
                f"fit the projections the model's VeRA adapters share (A {tuple(first.vera_A.shape)}, B "
                f"{tuple(first.vera_B.shape)}), which the first adapter sized: a later adapter needs the same r "
                "and no larger layers; add the one with the largest layers first"
            )
        if not config.save_projection and (rows, cols, first.vera_B.shape[0]) != (config.r, in_max, out_max):
            warnings.warn(
                f"VeRA adapter {adapter_name!r} uses the first adapter's projections (A {tuple(first.vera_A.shape)}), "
                f"not those its own config draws (A ({config.r}, {in_max})); with save_projection=false its file "
                "reloads exactly only after an adapter that sizes them the same (PEFT likewise)", UserWarning,
                stacklevel=4)
        return Projections(first.vera_A.clone(), first.vera_B.clone())
    if device.type == "meta":
        return Projections(torch.empty(config.r, in_max, device="meta"), torch.empty(out_max, config.r, device="meta"))
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    vera_A = kaiming_uniform((config.r, in_max), generator)
    vera_B = kaiming_uniform((out_max, config.r), generator)
    return Projections(vera_A.to(device), vera_B.to(device))


def model_tensors(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The projections under PEFT's keys when the config saves them (`save_projection`), else none
    (they are drawn again from `projection_prng_key` when the adapter is loaded)."""
    if not model.peft_config[adapter_name].save_projection:
        return {}
    proj = model.method_state[adapter_name]
    return {"base_model.vera_A": proj.vera_A, "base_model.vera_B": proj.vera_B}


def before_load(model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Projections in a file that are larger than this adapter's layers need (a later adapter's file,
    saved with the first adapter's projections) replace the adapter's own before they are loaded, so
    such a file loads on its own (PEFT refuses it: size mismatch). Smaller ones are left to the strict
    load, which names the mismatch."""
    if not model.peft_config[adapter_name].save_projection:
        return
    proj = model.method_state[adapter_name]
    new_a, new_b = tensors.get("base_model.vera_A"), tensors.get("base_model.vera_B")
    if new_a is None or new_b is None or new_a.dim() != 2 or new_b.dim() != 2:
        return
    rows, cols = proj.vera_A.shape
    if new_a.shape[0] == rows == new_b.shape[1] and new_a.shape[1] >= cols and new_b.shape[0] >= proj.vera_B.shape[0]:
        proj.vera_A = torch.empty(new_a.shape, dtype=proj.vera_A.dtype, device=proj.vera_A.device)
        proj.vera_B = torch.empty(new_b.shape, dtype=proj.vera_B.dtype, device=proj.vera_B.device)
