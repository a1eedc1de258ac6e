"""Inits that build A and B from the base weight and subtract scaling * B A from it, so the model's
outputs are unchanged at step 0 (PiSSA: top singular vectors; OLoRA: QR decomposition).

They change the base weights: an adapter made this way only fits a base model that went through
the same init. Loading such an adapter runs the init again (it is deterministic for `pissa` and
`olora`, and made so for `pissa_niter_<n>`), as PEFT does.
"""

from __future__ import annotations

import torch


def from_base_weight(layer, adapter_name: str, init: str) -> None:
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
