"""LoRA and DoRA over bitsandbytes' quantized linears: QLoRA's `Linear4bit` and LLM.int8's
`Linear8bitLt`.

The base layer computes as bitsandbytes does (dequantize and matmul in its compute dtype); the
adapter adds `B(A(x)) * s` in the activations' dtype exactly as over a float linear (the forward
is `Linear`'s). What needs the base weight as numbers, DoRA's weight norm, reads it dequantized
into float32 without gradient. Merging into the quantized weight is refused (`base_params` says
why); PiSSA and OLoRA, which rewrite the base weight, are refused as over any non-float layer.

These classes join the dispatch table (`layer.register_layer`) once bitsandbytes is imported,
which a model holding its layers has done; peftctl never imports it for a model without them.
"""

from __future__ import annotations

import torch

from peftctl.adapters.lora.linear import Linear

_LEVELS = {"Linear4bit": "4 bits (16 levels per block of 64 weights)", "Linear8bitLt": "8 bits (255 levels per row)"}


def dequantize(base) -> torch.Tensor:
    """The weight of a bitsandbytes Linear4bit or Linear8bitLt as a float32 (out, in) tensor."""
    import bitsandbytes as bnb

    weight = base.weight
    if isinstance(weight, bnb.nn.Params4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU kernel on CPUs with AVX512-BF16 at the
            # first inference call; unpack a copy to read the values.
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state).float()
    # LLM.int8: int8 rows and one float scale per row (SCB, the row's largest magnitude).
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale).float()


class QuantizedLinear(Linear):
    base_weight_inits = ()  # PiSSA and OLoRA rewrite the base weight: not a quantized one

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
