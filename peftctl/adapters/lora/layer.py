"""LoRA layers: what they share (`LoraLayer`) and which class wraps which base module (`dispatch`).

y = base(x) + B(A(dropout(x))) * scaling, per active adapter. The forward adds only the work the
formula needs: no dropout call when the rate is 0; the delta is computed as B(A(x)) in the
activations' dtype (the float32 adapter weights are cast down, the activations are never upcast);
the scaling multiplies the small r-wide intermediate; B @ A is never formed in the forward (DoRA's
weight norm is the exception the method itself needs, computed without gradient). `lora_delta` is
the module-graph form; `fused.py` computes the same for linear layers inside Llama-family blocks
with fused autograd functions (`peftctl.kernels.lora`) when training asks for it.

The layer classes: `Linear` (torch Linear and transformers' Conv1D, stored transposed),
`Embedding`, `Conv1d`, `Conv2d`, `Conv3d`; bitsandbytes' quantized linears (QLoRA) in `quantized.py`.
Other base-layer types join with `register_layer`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import nn

from peftctl.adapters.layer import AdapterLayer, LayerTypes, compute_dtype
from peftctl.adapters.lora import init as lora_init
from peftctl.adapters.lora.config import lora_scaling
from peftctl.adapters.matching import pattern_value


def check_rows(names: list[str], x: torch.Tensor) -> None:
    if len(names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} rows")


class LoraLayer(AdapterLayer):
    """A base module with LoRA adapters: y = base(x) + s * B(A(dropout(x))) for each active adapter
    (LoRA: Hu et al. 2021, arXiv 2106.09685, eq. 3), s = `config.lora_scaling(lora_alpha, r,
    use_rslora)`; with DoRA, `dora_output` instead.

    Per adapter name (dicts keyed by it): `r`, `lora_alpha`, `scaling` (s), `use_rslora`, `use_dora`,
    `lora_bias`, `lora_dropout` (nn.Dropout, nn.Identity at rate 0); the factors `lora_A` (in -> r)
    and `lora_B` (r -> out, with a bias when `lora_bias`), modules of the base layer's kind, or for
    an embedding `lora_embedding_A` (r, num_embeddings) and `lora_embedding_B` (embedding_dim, r);
    DoRA's magnitude m, `lora_magnitude_vector` (out_features values, in PEFT's saved shape).
    Adapter weights are float32 on the base weight's device; the forward casts them down to the
    compute dtype (`compute_dtype`) and never casts activations up. The output has the base layer's
    output shape.

    A subclass per base-layer kind gives `create_weights`, `delta_weight` (s * B A as a float32
    tensor shaped like the base weight: what merging adds) and `lora_delta`.

    Raises ValueError when an adapter is created with an init the layer kind cannot do (PiSSA and
    OLoRA need a float linear), DoRA over a weight the layer cannot read, a rank a convolution's
    groups do not divide, or `lora_bias` on an embedding; in the forward for `adapter_names` whose
    length is not the batch's; when merging `lora_bias` into a layer without a bias. TypeError for
    DoRA on a layer kind without it.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")
    # What `init_lora_weights` values this layer type accepts beyond true/false/gaussian.
    base_weight_inits: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        # DoRA: the trained magnitude, shaped as PEFT saves it (`...lora_magnitude_vector`).
        self.lora_magnitude_vector = nn.ParameterDict()
        # DoRA: the weight norm at merge time, needed to unmerge exactly.
        self._dora_merge_norm: dict[str, torch.Tensor] = {}

    # ---- what each layer type provides -------------------------------------------------------
    @abc.abstractmethod
    def create_weights(self, adapter_name: str, r: int, lora_bias: bool, factory: dict) -> None:
        """Create this adapter's A and B (and B's bias) for rank r, with their default init."""

    def reset_weights(self, adapter_name: str, init: bool | str) -> None:
        """Default init (True) or gaussian: A random, B zero, so the output is unchanged."""
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(a.weight, std=1 / self.r[adapter_name])
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)

    @abc.abstractmethod
    def lora_delta(self, adapter_name: str, x: torch.Tensor, apply_dropout: bool = True) -> torch.Tensor:
        """s * B(A(dropout(x))): one adapter's contribution, added to the base layer's output.

        x: the base layer's input, (..., in_features) for a linear layer; returns (..., out_features)
        in the compute dtype (`compute_dtype(x)`: autocast's when it is on, else x's), to which the
        float32 factors are cast (x is never cast up). s multiplies the r-wide intermediate, and
        B @ A is never formed. `apply_dropout=False`: the caller applied it (DoRA). The one
        function a fused kernel replaces; each layer kind states its shapes."""

    def scaled_b(self, adapter_name: str, h: torch.Tensor,
                 apply_b: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """s * B(h) + s * B's bias, for h = A(dropout(x)), the r-wide intermediate in the compute
        dtype: s multiplies h (skipped when 1), B's bias is scaled in float32 then cast to h's dtype,
        B's weight is cast to it, and `apply_b(h, weight, bias)` applies B as its layer kind does
        (`F.linear`, a 1x1 convolution's `_conv_forward`). The sequence every `lora_delta` shares,
        written once: where a fused kernel goes (`kernels.lora` fuses the same sequence for linear
        layers on the training fast path, `fused.py`)."""
        b = self.lora_B[adapter_name]
        scale = self.scaling[adapter_name]
        if scale != 1.0:
            h = h * scale
        bias = None if b.bias is None else (b.bias * scale).to(h.dtype)
        return apply_b(h, b.weight.to(h.dtype), bias)

    def to_out_first(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the base weight, viewed with the output dimension first."""
        return t

    def from_out_first(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def base_output_without_bias(self, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        """W x for DoRA, from the running result when the input is what the base layer saw."""
        raise TypeError(f"DoRA is not available on {type(self.get_base_layer()).__name__} layers")

    def reads_base_weight(self) -> bool:
        """Whether `base_weight` can give the base weight's values (a quantized layer class says how)."""
        return self.get_base_layer().weight.is_floating_point()

    def base_weight(self) -> torch.Tensor:
        """The base weight's values in float32, detached (DoRA's norm; PiSSA and OLoRA)."""
        return self.get_base_layer().weight.detach().float()

    # ---- creating an adapter ------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, module_name: str = "", r: int | None = None,
                     lora_alpha: float | None = None) -> None:
        if r is None:
            r = pattern_value(config.rank_pattern, module_name, config.r, "rank_pattern")
        if lora_alpha is None:
            lora_alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha, "alpha_pattern")
        init = config.init_lora_weights
        if isinstance(init, str) and init != "gaussian" and not any(init.startswith(k) for k in self.base_weight_inits):
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weight of a float linear layer; {module_name} "
                f"is a {type(self.get_base_layer()).__name__}"
            )
        if config.use_dora and not self.reads_base_weight():
            raise ValueError(f"DoRA needs the base weight's values; {module_name} holds a "
                             f"{self.get_base_layer().weight.dtype} weight that this layer cannot read")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, config.use_rslora)
        self.use_dora[adapter_name] = config.use_dora
        self.lora_bias[adapter_name] = config.lora_bias
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

        weight = self.get_base_layer().weight
        meta = weight.device.type == "meta"
        # Adapter weights live in float32 (stable optimizer updates) on the base weight's device.
        # They are created with the layer's own default init first, as PEFT does, so that a seed
        # gives PEFT's numbers (and init_lora_weights=false keeps those random values). Random
        # values are drawn on the CPU and then moved: a seed gives the same adapter wherever the
        # base sits (loaded onto a GPU, or in host memory for FSDP to shard; CUDA's generator
        # draws other numbers than the CPU's).
        self.create_weights(adapter_name, r, config.lora_bias, {"device": "meta" if meta else "cpu",
                                                                "dtype": torch.float32})
        if not meta:
            if init is True or init == "gaussian":
                self.reset_weights(adapter_name, init)
            self._move_adapter(adapter_name, weight.device)
            if isinstance(init, str) and init != "gaussian":
                lora_init.from_base_weight(self, adapter_name, init)
            if config.use_dora:
                self.lora_magnitude_vector[adapter_name] = nn.Parameter(self.dora_norm(adapter_name))
        elif config.use_dora:
            shape = self.magnitude_shape()
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(torch.empty(shape, device="meta"))
        self.set_adapter(self.active_adapters, trainable=False)
        self.match_mode(adapter_name)

    def _move_adapter(self, adapter_name: str, device: torch.device) -> None:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(item.data.to(device), requires_grad=item.requires_grad)
            else:
                item.to(device)

    # ---- forward ------------------------------------------------------------------------------
    def dropout(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        drop = self.lora_dropout[adapter_name]
        return x if isinstance(drop, nn.Identity) else drop(x)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            result = self.adapter_output(name, x, result)
        return result

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the output so far) with this adapter applied."""
        if self.use_dora[adapter_name]:
            return self.dora_output(adapter_name, x, result)
        return result + self.lora_delta(adapter_name, x)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; unmerge them first")
        names = self.batch_adapter_names
        check_rows(names, x)
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(names):
            if name not in self.r:  # "__base__", or an adapter that does not touch this layer
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            part = self.adapter_output(name, x[rows], result[rows])
            result = result.index_copy(0, rows, part.to(result.dtype))
        return result

    # ---- DoRA -----------------------------------------------------------------------------------
    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def dora_norm(self, adapter_name: str, base_weight: torch.Tensor | None = None,
                  delta: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A||_c: the norm of each output row (all input entries of an output channel),
        float32, shaped like the magnitude, computed without gradient (see `dora_output`)."""
        with torch.no_grad():
            w = self.base_weight() if base_weight is None else base_weight
            d = self.delta_weight(adapter_name) if delta is None else delta
            norm = (self.to_out_first(w) + self.to_out_first(d)).flatten(1).norm(dim=1)
        return norm.view(self.magnitude_shape())

    def dora_factor(self, adapter_name: str) -> torch.Tensor:
        """m / ||W + scaling B A||, shaped like the magnitude (gradient flows to m only)."""
        return self.lora_magnitude_vector[adapter_name] / self.dora_norm(adapter_name)

    def dora_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the output so far, W x + bias) with a DoRA adapter applied.

        DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5) re-parametrises the adapted weight as
        W' = m * (W + s B A) / ||W + s B A||_c, m a trained magnitude per output row. With
        f = m / ||W + s B A||_c, the output W' x + bias = result + (f - 1) W x + f * lora_delta(x),
        with W x from the base output so far (or the base layer again, on the dropped-out input in
        training), so B A is formed only for the norm. The norm is detached (a constant in the
        backward), as the paper's section 4.3 proposes and PEFT does: its gradient would keep the
        weight-sized W + s B A of every adapted layer in the autograd graph, and the paper measures
        no loss in accuracy from treating it as a constant. Shapes and dtype: `lora_delta`'s."""
        dtype = compute_dtype(x) if x.is_floating_point() else result.dtype
        factor = self.dora_factor(adapter_name).to(dtype).reshape(self.factor_view())
        if isinstance(self.lora_dropout[adapter_name], nn.Identity) or not self.training:
            base = self.base_output_without_bias(x, result)
        else:
            x = self.dropout(adapter_name, x)
            base = self.base_output_without_bias(x, None)
        # The dropout is already applied above; lora_delta would apply it again.
        delta = self.lora_delta(adapter_name, x, apply_dropout=False)
        return result + (factor - 1) * base + factor * delta

    def factor_view(self) -> tuple[int, ...]:
        """How the per-output factor broadcasts over an output activation (channels last)."""
        return (-1,)

    # ---- merging --------------------------------------------------------------------------------
    def merged_params(self, adapter_name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delta = self.delta_weight(adapter_name)
        out = dict(params)
        if self.use_dora[adapter_name]:
            # The norm is the unmerged weight's, as in the forward, even when other adapters are merged.
            norm = self.dora_norm(adapter_name, self.unmerged_base_params()["weight"], delta)
            self._dora_merge_norm[adapter_name] = norm
            out["weight"] = self._dora_weight_factor(adapter_name, norm) * (params["weight"] + delta)
        else:
            out["weight"] = params["weight"] + delta
        if self.lora_bias[adapter_name]:
            out["bias"] = self._base_bias(params) + self._lora_bias(adapter_name)
        return out

    def unmerged_params(self, adapter_name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delta = self.delta_weight(adapter_name)
        out = dict(params)
        if self.use_dora[adapter_name]:
            factor = self._dora_weight_factor(adapter_name, self._dora_merge_norm[adapter_name])
            out["weight"] = params["weight"] / factor - delta
        else:
            out["weight"] = params["weight"] - delta
        if self.lora_bias[adapter_name]:
            out["bias"] = self._base_bias(params) - self._lora_bias(adapter_name)
        return out

    def _dora_weight_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        factor = (self.lora_magnitude_vector[adapter_name].detach().float() / norm).flatten()
        ndim = self.get_base_layer().weight.dim()
        return self.from_out_first(factor.view(-1, *[1] * (ndim - 1)))

    def _lora_bias(self, adapter_name: str) -> torch.Tensor:
        return self.lora_B[adapter_name].bias.detach().float() * self.scaling[adapter_name]

    def _base_bias(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if "bias" not in params:
            raise ValueError(
                "an adapter with lora_bias cannot be merged into a layer that has no bias "
                f"({type(self.get_base_layer()).__name__} without bias)"
            )
        return params["bias"]

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Set the scaling to `scale` times its configured value (PEFT's `set_scale`)."""
        if adapter_name not in self.scaling:
            return
        r, alpha = self.r[adapter_name], self.lora_alpha[adapter_name]
        self.scaling[adapter_name] = scale * lora_scaling(alpha, r, self.use_rslora[adapter_name])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_merge_norm.pop(adapter_name, None)

    def describe(self, adapter_name: str) -> str:
        return f"r={self.r[adapter_name]}" if adapter_name in self.r else ""

    def saved_activations(self) -> tuple[bool, int]:
        return True, sum(self.r.values())  # the input (A's gradient) and the r-wide intermediates

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ---- dispatch: which layer class wraps which base module ----------------------------------------


def _builtin_types() -> list[tuple[type, type[LoraLayer]]]:
    from transformers.pytorch_utils import Conv1D

    from peftctl.adapters.lora.conv import Conv1d, Conv2d, Conv3d
    from peftctl.adapters.lora.embedding import Embedding
    from peftctl.adapters.lora.linear import Linear

    return [(nn.Embedding, Embedding), (nn.Conv1d, Conv1d), (nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d),
            (nn.Linear, Linear), (Conv1D, Linear)]


def _quantized_types() -> list[tuple[type, type[LoraLayer]]]:
    from peftctl.adapters.lora.quantized import layer_types

    return layer_types()


LAYER_TYPES = LayerTypes("LoRA", _builtin_types, _quantized_types)
register_layer = LAYER_TYPES.register  # e.g. register_layer(bnb.nn.Linear4bit, QuantizedLinear)
dispatch = LAYER_TYPES.dispatch  # the LoRA layer for a base module, or a TypeError naming it


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str, **options) -> None:
    """A new LoRA adapter combining existing ones (`combine.py`; the registry's hook for it)."""
    from peftctl.adapters.lora.combine import add_weighted_adapter as combine

    combine(model, adapters, weights, adapter_name, **options)


def __getattr__(name: str):
    # `from peftctl.adapters.lora.layer import Linear` keeps working: the classes live in their
    # own modules, which import this one.
    modules = {"Linear": "linear", "Embedding": "embedding", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv"}
    if name in modules:
        import importlib

        return getattr(importlib.import_module(f"peftctl.adapters.lora.{modules[name]}"), name)
    raise AttributeError(name)
