"""LoRA and DoRA over bitsandbytes' quantized linears: QLoRA's `Linear4bit` and LLM.int8's
`Linear8bitLt`.

The base layer computes as bitsandbytes does (dequantize and matmul in its compute dtype); the
adapter adds `B(A(x)) * s` in the activations' dtype exactly as over a float linear (the forward
is `Linear`'s). What needs the base weight as numbers, DoRA's weight norm, reads it dequantized
into float32 without gradient (`peftctl.bnb.dequantize`, which changes nothing in the layer). A
4-bit base stays in bitsandbytes' plain layout on every CPU (`peftctl.bnb.keep_plain_layout`, which
`AdapterModel` applies to the whole model): evaluating the model changes nothing in how it trains.
Merging into the quantized weight is refused (`base_params` says why); PiSSA and OLoRA, which
rewrite the base weight, are refused as over any non-float layer.

These classes join the dispatch table (`layer.register_layer`) once bitsandbytes is imported,
which a model holding its layers has done; peftctl never imports it for a model without them.
"""

from __future__ import annotations

import torch

from peftctl.adapters.lora.linear import Linear
from peftctl.bnb import dequantize, keep_plain_layout

__all__ = ["QuantizedLinear", "dequantize", "layer_types"]

_LEVELS = {"Linear4bit": "4 bits (16 levels per block of 64 weights)", "Linear8bitLt": "8 bits (255 levels per row)"}


class QuantizedLinear(Linear):
    base_weight_inits = ()  # PiSSA and OLoRA rewrite the base weight: not a quantized one

    def __init__(self, base_layer, adapter_name: str, config, module_name: str = "", **kwargs):
        keep_plain_layout(base_layer, module_name)  # before anything reads its weight (DoRA's magnitude)
        super().__init__(base_layer, adapter_name, config, module_name=module_name, **kwargs)

    def reads_base_weight(self) -> bool:
        return True

    def base_weight(self) -> torch.Tensor:
        return dequantize(self.get_base_layer())

    def base_output_without_bias(self, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
        if result is None:  # the input differs from the base layer's (DoRA with dropout): run it again
            result = self.get_base_layer()(x)
        bias = self.bias
        return result if bias is None else result - bias.to(result.dtype)

    def base_params(self) -> dict[str, torch.Tensor]:
        kind = type(self.get_base_layer()).__name__
        raise ValueError(
            f"merging into a quantized {kind} weight is refused: the merged weight would be rounded back "
            f"to {_LEVELS.get(kind, 'its quantized levels')}, and a LoRA update is mostly far smaller than "
            "one step between levels, so most of what the adapter learned would be rounded away (and the "
            "merge could not be undone). Merge into the base model loaded in its original precision: "
            "`peftctl merge RUN_DIR` does (and re-quantizes the merged model with --quantize)"
        )


def layer_types() -> list[tuple[type, type[QuantizedLinear]]]:
    import bitsandbytes as bnb

    return [(bnb.nn.Linear4bit, QuantizedLinear), (bnb.nn.Linear8bitLt, QuantizedLinear)]
