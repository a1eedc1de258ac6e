"""Peak training memory per device, estimated from the model's structure: the one estimator behind
`peftctl train --dry-run` and `peftctl inspect RECIPE --memory`.

The model is the one a run trains, built on the meta device (no weights): the adapter attached and,
for a quantized base, bitsandbytes' layer types in place. Counted in bytes:

- weights: every frozen parameter at its dtype's size; a bitsandbytes 4-bit linear at half a byte
  per weight plus its block scales (one per 64 weights: a uint8 with double quantization, and a
  float32 per 256 blocks; a float32 without) and code books, an 8-bit one at one byte plus a
  float32 per row: bitsandbytes' storage exactly.
- adapter: the trainable parameters, their gradients (same dtype) and the optimizer's state.
- activations: what autograd keeps for the backward pass, per token and layer of a pre-norm decoder,
  counted tensor by tensor as Korthikanti et al. 2022 (arXiv 2205.05198, section 4.1) count a GPT
  layer's sbh(34 + 5as/h) bytes (16-bit; s tokens, b sequences, a heads); here with SDPA attention
  (no attention matrix is kept: their 5as/h term is gone), RMSNorm, a gated MLP and the adapters.
  In the activations' dtype (b bytes from here on) unless
  said: each RMSNorm's float32 copy of its input (4h; a LayerNorm keeps its input, bh); the rotated
  query, keys and values and the attention output (b(2h + 2kv); o_proj's adapter reads that same
  output tensor); the MLP's gate output, activation output and up output (3bi; 1bi without a
  gate); and the inputs of the adapted projections, once per shared input (q/k/v: bh; gate/up: bh;
  down: bi; other adapted layers: their input width), plus what each adapter layer says it keeps
  besides (`AdapterLayer.saved_activations`: LoRA's r-wide intermediates; an IA3 layer that scales
  its output keeps that output instead of its input), and the full-size updates that LoHa and
  LoKr layers build from their factors and keep for the backward (`saved_weights`, whatever the
  number of tokens; one layer's with gradient checkpointing).
  Frozen linears keep nothing (they need no weight gradient), nor do bitsandbytes' 4-bit ones;
  its 8-bit ones keep their input like an adapted layer.
  With the fused kernels (`adapters.lora.fused`; blocks whose adapter layers are all plain LoRA
  linears, which its projections compute) each norm keeps its input and a float32 per row,
  q/k/v and the MLP keep their inputs once, and the MLP keeps its gate and up outputs only (the
  product is recomputed).
  With gradient checkpointing only each layer's input (bh) is kept, plus one layer's full set while
  it is recomputed; with k of the layers checkpointed (the first ones), the others' full sets, or
  the recomputed set when it is larger; with the inputs offloaded (`kernels.offload`), not even
  those. Either way the backward of one layer adds its gradients (about b(3i + 2h)), and
  a quantized layer dequantizes one weight at a time (the largest, in the compute dtype).
  All of it is added up, a little above the true peak: the loss's chunk is freed before the
  backward's layer workspace is taken.
- logits: Llama-family heads go through `kernels.linear_cross_entropy` (one chunk of float32
  logits, its budget, plus the head input and its gradient for the loss tokens); other heads
  materialise the loss positions' logits, their float32 copy and its gradient.

The per-layer count is the autograd graph of transformers' Llama written out. Against measured
peaks (bench/results/README.md, "QLoRA, and the memory estimate against measured peaks";
bench/results/2026-11-28-h200-qlora-8b.json: `bench/qlora.py`, Llama-3.1-8B shape, LoRA r=16 on
the 7 projections, batch 4 x 2048, gradient checkpointing, one H200): 11.0 GiB estimated for 9.9
measured with an nf4 base, 20.5 for 19.5 in bfloat16, about 5-11% above. The same count with PEFT's
float32 copies of each adapted layer's input (PEFT upcasts them; peftctl computes the adapter in
the activations' dtype) gives 72 GiB of activations without checkpointing for that shape, where
PEFT's measured peak is 99.4 GiB (bench/results/2026-11-28-h200-lora-bf16-8b.json), about 72 of
them activations once its 15 GiB of weights and 12 of logits are taken off.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Suffixes of adapted projections that read the same input tensor within a layer (Llama naming).
_ATTN_INPUT = ("q_proj", "k_proj", "v_proj", "qkv_proj")
_MLP_INPUT = ("gate_proj", "up_proj", "gate_up_proj")
_MLP_MIDDLE = ("down_proj",)
_ATTN_OUTPUT = ("o_proj",)  # reads the attention output, which SDPA keeps anyway
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Workload:
    batch: int  # sequences per micro-batch
    seq_len: int  # tokens per sequence (padded)
    loss_fraction: float = 1.0  # share of positions that predict a loss token


def optimizer_state_bytes(optimizer: str, momentum: float, numel: int, shape: tuple[int, ...], element: int) -> int:
    """Bytes of optimizer state for one trainable parameter."""
    if optimizer == "adamw":
        return 2 * numel * element  # exp_avg, exp_avg_sq in the parameter's dtype
    if optimizer == "paged_adamw_32bit":
        return 8 * numel
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * numel if numel >= 4096 else 8 * numel  # bitsandbytes keeps small tensors in 32 bits
    if optimizer == "adafactor":  # factored second moment, no first moment
        return 4 * (shape[0] + math.prod(shape[1:])) if len(shape) >= 2 else 4 * numel
    return numel * element if momentum else 0  # sgd


def _quantized_bytes(module) -> tuple[str, int, int]:
    """(storage name, bytes, weights) of a bitsandbytes linear layer's weight."""
    n = module.in_features * module.out_features
    if type(module).__name__ == "Linear8bitLt":
        return "int8", n + 4 * module.out_features, n
    blocks = math.ceil(n / 64)
    double = bool(getattr(module.weight, "compress_statistics", False))
    # Scales, and the code books: 16 float32 values, and with double quantization 256 more and an offset.
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 1) if double else 4 * blocks
    kind = getattr(module.weight, "quant_type", "nf4") + ("+dq" if double else "")
    return kind, n // 2 + scales + 4 * 16, n


def _dims(config) -> tuple[int, int, int, int]:
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return hidden, inter, kv, config.num_hidden_layers


def fused_applies(inner) -> bool:
    """Whether `adapters.lora.fused` replaces this model's decoder blocks (norms and MLPs at least):
    blocks of the types it knows, whose adapter layers are all ones its projections compute (LoRA
    linears without DoRA or `lora_bias`; other methods' layers, IA3, AdaLoRA, LoHa, LoKr, VeRA, make the
    blocks run their own forwards)."""
    from peftctl.adapters.layer import AdapterLayer
    from peftctl.adapters.lora.fused import MLPS, NORMS
    from peftctl.adapters.lora.layer import LoraLayer
    from peftctl.adapters.lora.linear import Linear

    def computed(m) -> bool:
        return (isinstance(m, LoraLayer) and isinstance(m, Linear) and not any(m.use_dora.values())
                and all(b.bias is None for b in m.lora_B.values()))

    names = {type(m).__name__ for m in inner.modules()}
    adapted = [m for name, m in inner.named_modules() if isinstance(m, AdapterLayer) and _LAYER_INDEX.search(name)]
    return bool(names & MLPS) and bool(names & NORMS) and all(computed(m) for m in adapted)


@dataclass(frozen=True)
class Parts:
    """What the estimate adds up, in bytes per device."""

    weights: dict[str, int]
    adapter: int  # trainable parameters (their gradients are as many bytes)
    states: int  # optimizer state
    logits: int
    layers: int
    tokens: int
    per_layer: int  # activations one decoder layer keeps, per token
    layer_input: int  # one layer's input, all tokens (what a checkpointed layer keeps)
    always: int  # kept however layers are checkpointed
    fused: bool
    kept_weights: int = 0  # adapter weights built per forward and kept for the backward (LoHa's, LoKr's ΔW), all layers

    def activations(self, k: int, offload: bool = False) -> int:
        """With the first k decoder layers checkpointed (their recompute comes after the backward
        of the others, so it adds to the peak only when every layer is checkpointed). A layer's
        full set includes its share of `kept_weights`, which a checkpointed layer drops too."""
        layer = self.tokens * self.per_layer + self.kept_weights // max(self.layers, 1)
        if k == 0:
            return self.tokens * self.layers * self.per_layer + self.kept_weights + self.always
        keep = 0 if offload else self.layer_input
        return max((self.layers - k) * layer, layer) + k * keep + self.always

    def total(self, k: int, offload: bool = False) -> int:
        return sum(self.weights.values()) + 2 * self.adapter + self.states + self.activations(k, offload) + self.logits


def estimate(peft_model, config, *, workload: Workload, gradient_checkpointing: bool, optimizer: str,
             momentum: float = 0.0, fused: bool = False, checkpoint_layers: int | None = None,
             offload: bool = False) -> dict:
    """Bytes per device: weights (by storage), adapter state, activations (both ways), logits.

    `fused`: the run uses `adapters.lora.fused` (counted only where the model's blocks are of the
    types it replaces). `checkpoint_layers`: how many decoder layers (the first ones) are
    checkpointed (default: all with gradient_checkpointing, else none); `offload`: their kept
    inputs wait in host memory (`kernels.offload`)."""
    p = parts(peft_model, config, workload=workload, optimizer=optimizer, momentum=momentum, fused=fused)
    if checkpoint_layers is None:
        checkpoint_layers = p.layers if gradient_checkpointing else 0
    offload = offload and checkpoint_layers > 0
    out = {
        "weights": dict(sorted(p.weights.items())),
        "base_weights": sum(p.weights.values()),
        "adapter_weights": p.adapter,
        "gradients": p.adapter,
        "optimizer_states": p.states,
        "activations": p.activations(checkpoint_layers, offload),
        "activations_with_checkpointing": p.activations(p.layers),
        "activations_without_checkpointing": p.activations(0),
        "gradient_checkpointing": checkpoint_layers > 0,
        "checkpoint_layers": checkpoint_layers,
        "offload": offload,
        "fused": p.fused,
        "layers": p.layers,
        "logits": p.logits,
        "tokens": p.tokens,
    }
    out["total"] = p.total(checkpoint_layers, offload)
    return out


def plan_budget(p: Parts, budget_bytes: int) -> dict:
    """The fastest setting whose estimate fits `budget_bytes`: the fewest checkpointed layers (each
    costs its forward again in the backward), and at equal count no offloading. When nothing fits,
    the smallest setting (every layer checkpointed, inputs offloaded), with `fits` false.

    Returns {"budget": bytes, "checkpoint_layers": k, "offload": bool, "estimate": bytes, "fits": bool}."""
    for k in range(p.layers + 1):
        for off in (False, True) if k else (False,):
            if p.total(k, off) <= budget_bytes:
                return {"budget": budget_bytes, "checkpoint_layers": k, "offload": off, "estimate": p.total(k, off),
                        "fits": True}
    return {"budget": budget_bytes, "checkpoint_layers": p.layers, "offload": True,
            "estimate": p.total(p.layers, True), "fits": False}


def parts(peft_model, config, *, workload: Workload, optimizer: str, momentum: float = 0.0,
          fused: bool = False) -> Parts:
    """The pieces of the estimate (see the module docstring and `estimate`)."""
    import torch

    from peftctl.adapters.layer import AdapterLayer
    from peftctl.loss import inner_model, plain_head

    inner = inner_model(peft_model)
    act_dtype = inner.get_input_embeddings().weight.dtype
    b = torch.empty((), dtype=act_dtype).element_size()

    weights: dict[str, int] = {}
    seen: set[int] = set()  # tensors counted (a quantized weight by its packed size, below)
    largest_quantized = 0
    for module in inner.modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            kind, nbytes, n = _quantized_bytes(module)
            weights[kind] = weights.get(kind, 0) + nbytes
            seen.add(id(module.weight))
            largest_quantized = max(largest_quantized, n)
    # The model's parameters, and what a method keeps outside the layers: its trainable parameters (a
    # prompt-learning method's virtual tokens and P-tuning's or a projected prefix's encoder) count as
    # the adapter's; frozen ones and buffers (VeRA's shared projections) as weights.
    tensors = list(inner.parameters())
    method_state = getattr(getattr(peft_model, "base_model", None), "method_state", None)
    if isinstance(method_state, torch.nn.Module):
        tensors += [*method_state.parameters(), *method_state.buffers()]
    adapter = states = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if t.requires_grad:
            adapter += nbytes
            states += optimizer_state_bytes(optimizer, momentum, t.numel(), tuple(t.shape), t.element_size())
        else:
            name = str(t.dtype).removeprefix("torch.")
            weights[name] = weights.get(name, 0) + nbytes

    hidden, inter, kv, layers = _dims(config)
    heads = config.num_attention_heads
    fused = fused and fused_applies(inner)
    # Layers in the decoder blocks whose input autograd keeps: the adapted ones whose adapter needs it
    # for its gradient (LoRA's A) and bitsandbytes' 8-bit ones (its backward reads its input).
    keepers = {name.removesuffix(".base_layer").rsplit(".", 1)[-1]: m for name, m in inner.named_modules()
               if _LAYER_INDEX.search(name) and ((isinstance(m, AdapterLayer) and m.saved_activations()[0])
                                                 or type(m).__name__ == "Linear8bitLt")}
    gated = any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in inner.named_modules())
    rms = any("RMSNorm" in type(m).__name__ for m in inner.modules())
    if fused:
        # Fused: each norm keeps its input and a float32 per row; q/k/v and the MLP keep their
        # input once; the MLP keeps its gate and up outputs only; attention keeps q, k, v, its
        # output and a float32 log-sum-exp per head.
        norm = b * hidden + 4
        per_layer = 2 * norm + b * (2 * hidden + 2 * kv) + 4 * heads + 2 * b * hidden + 2 * b * inter
    else:
        norm = 4 * hidden if rms else b * hidden
        per_layer = 2 * norm + b * (2 * hidden + 2 * kv) + b * inter * (3 if gated else 1)
        per_layer += b * hidden * (bool(keepers.keys() & set(_ATTN_INPUT)) + bool(keepers.keys() & set(_MLP_INPUT)))
        per_layer += b * inter * bool(keepers.keys() & set(_MLP_MIDDLE))
        for suffix in keepers.keys() - set(_ATTN_INPUT + _MLP_INPUT + _MLP_MIDDLE + _ATTN_OUTPUT):
            per_layer += b * getattr(keepers[suffix], "in_features", hidden)
    adapted = [m for name, m in inner.named_modules() if isinstance(m, AdapterLayer) and _LAYER_INDEX.search(name)]
    per_layer += int(b * sum(m.saved_activations()[1] for m in adapted) / max(layers, 1))
    tokens = workload.batch * workload.seq_len
    loss_tokens = max(1, int(tokens * workload.loss_fraction))
    # A prompt-learning adapter's virtual tokens run through every layer with each sequence.
    prepended = getattr(type(peft_model), "prepended_tokens", None)
    tokens += workload.batch * (prepended(peft_model) if prepended else 0)
    # Kept whether or not layers are checkpointed: the final norm's input, one layer's gradients
    # during its backward, one dequantized weight.
    always = tokens * (norm + b * (3 * inter + 2 * hidden)) + largest_quantized * b
    # Adapter weights built per forward and kept for the backward (LoHa's and LoKr's ΔW): all of
    # them, or one layer's while it is recomputed under gradient checkpointing.
    kept_weights = b * sum(m.saved_weights() for m in adapted)

    vocab = config.vocab_size
    if plain_head(inner) is not None:
        from peftctl.kernels.linear_cross_entropy import default_chunk_rows

        rows = min(default_chunk_rows(vocab), loss_tokens)
        logits = rows * vocab * 8 + 2 * loss_tokens * hidden * b
    else:
        logits = loss_tokens * vocab * (b + 4 + 4)
    return Parts(weights=weights, adapter=adapter, states=states, logits=logits, layers=layers, tokens=tokens,
                 per_layer=per_layer, layer_input=tokens * b * hidden, always=always, fused=fused,
                 kept_weights=kept_weights)
