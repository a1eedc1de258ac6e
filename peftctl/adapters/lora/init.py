"""Inits that build A and B from the base weight and subtract scaling * B A from it, so the model's
outputs are unchanged at step 0 (PiSSA: top singular vectors; OLoRA: QR decomposition).

- PiSSA (Meng et al. 2024, arXiv 2404.02948): W = U S V^T; with the r largest singular values,
  A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so s B A = U_r S_r V_r^T (the principal part),
  and the base keeps the residual W - s B A. `pissa_niter_<n>`: the paper's fast initialisation, a
  randomized SVD (`torch.svd_lowrank`, n subspace iterations).
- OLoRA (Büyükakyüz 2024, arXiv 2406.01775): W = Q R (QR decomposition); B = Q[:, :r] (orthonormal
  columns), A = R[:r], and the base keeps W - s B A.

They change the base weights: an adapter made this way only fits a base model that went through
the same init. Loading such an adapter runs the init again (it is deterministic for `pissa` and
`olora`, and made so for `pissa_niter_<n>`), as PEFT does.
"""

from __future__ import annotations

import torch

from peftctl.adapters.lora.config import rank_factor


def from_base_weight(layer, adapter_name: str, init: str) -> None:
    """Set the adapter's A (r, in) and B (out, r) by `init` ("pissa", "pissa_niter_<n>", "olora")
    from the base weight W (out, in; a Conv1D's transposed), computed in float32, and replace W in
    place by W - s B A in its own dtype. Raises TypeError for a non-float weight, ValueError when r
    exceeds min(out, in)."""
    base = layer.get_base_layer()
    weight = base.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"init_lora_weights={init!r} needs a float base weight, not {weight.dtype}")
    w = layer.to_out_first(weight.detach().float())  # (out, in)
    r, scale = layer.r[adapter_name], layer.scaling[adapter_name]
    if r > min(w.shape):
        raise ValueError(f"init_lora_weights={init!r} needs r <= {min(w.shape)} for a {tuple(w.shape)} weight (r={r})")
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        if init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:  # pissa_niter_<n>: randomized SVD, much faster on large weights
            # A fixed seed makes it repeatable, so loading the adapter rebuilds the same residual
            # base weight (PEFT draws from the global generator, which a reload does not repeat).
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(w, r, niter=int(init.rsplit("_", 1)[1]))
            vh = v.T
        s = (s / scale).sqrt()
        a, b = (s[:, None] * vh).contiguous(), (u * s).contiguous()
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(a)
        layer.lora_B[adapter_name].weight.copy_(b)
        residual = w - scale * (b @ a)
        weight.copy_(layer.from_out_first(residual).to(weight.dtype))


# ---- PiSSA / OLoRA as a plain LoRA on the original base ---------------------------------------
#
# After init the base is W_res = W - s B0 A0; after training the model computes W_res + s B A. On the
# original W the same outputs come from the update s (B A - B0 A0) = s [B | -B0] [A ; A0]: a plain
# LoRA of rank 2r with the same scaling (PEFT's `subtract_mutated_init`, used by
# `save_pretrained(path_initial_model_for_weight_conversion=...)`). It loads on the original base in
# any PEFT version, next to other adapters, and can be disabled or merged like any LoRA.

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")


def as_plain_lora(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config, source: str):
    """(tensors, config) of the plain LoRA equivalent to a PiSSA / OLoRA adapter on the original base.

    `tensors`: the trained adapter's saved tensors (PEFT keys); `initial`: the same adapter's tensors
    right after init (A0, B0; other keys are ignored); `source` names where `initial` came from, for
    errors. A becomes [A ; A0] (rows), B becomes [B | -B0] (columns); other tensors (modules_to_save
    copies, trained biases) are kept as they are. The config gets init_lora_weights=true, r and every
    rank_pattern value doubled, and lora_alpha (and alpha_pattern) changed to keep each module's
    scaling: doubled, or multiplied by sqrt(2) with rsLoRA (scaling = alpha / sqrt(r)).
    Raises ValueError for DoRA (the magnitude re-normalises the weight: no additive update) and
    when `initial` lacks a factor or holds one of another shape.
    """
    if getattr(config, "use_dora", False):
        raise ValueError("a DoRA adapter cannot be converted to plain LoRA: its weight normalisation is not an additive update")
    if config.init_lora_weights is False:
        raise ValueError("init_lora_weights=false starts from random A and B: the adapter's change since then is "
                         "not its effect, so there is nothing to convert")
    out = {}
    for key, t in tensors.items():
        factor = next(((i, s) for i, group in enumerate((_A_SUFFIXES, _B_SUFFIXES)) for s in group if key.endswith(s)),
                      None)
        if factor is None:
            out[key] = t
            continue
        if key not in initial:
            raise ValueError(f"{source}: the initial adapter has no {key}; it is not this adapter's initial state")
        t0 = initial[key].to(device=t.device, dtype=t.dtype)
        if t0.shape != t.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(t0.shape)} there and {tuple(t.shape)} here; "
                             "it is not this adapter's initial state")
        out[key] = torch.cat([t, t0], dim=0) if factor[0] == 0 else torch.cat([t, -t0], dim=1)
    alpha_factor = rank_factor(2, config.use_rslora)  # the scaling kept at twice the rank
    config = config.model_copy(update={
        "init_lora_weights": True,
        "r": 2 * config.r,
        "lora_alpha": alpha_factor * config.lora_alpha,
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: alpha_factor * v for k, v in config.alpha_pattern.items()},
    })
    return out, config
