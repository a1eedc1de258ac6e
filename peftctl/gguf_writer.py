"""A llama-family transformers model written as one GGUF file (llama.cpp's format, for llama.cpp,
Ollama and transformers' own GGUF loader), with the `gguf` package.

What makes the file right and self-contained:
- llama.cpp's metadata keys (`llama.*`) and tensor names (`token_embd`, `blk.N.attn_q`, ...,
  `output_norm`, `output` unless tied to the embeddings);
- the q and k projection rows permuted as llama.cpp's converter does: llama.cpp's rotary embedding
  rotates adjacent pairs of values, transformers' the two halves of each head (transformers' GGUF
  reader undoes the same permutation);
- norms and other 1-D tensors in float32, matrices in the chosen dtype;
- Llama 3's rotary scaling as llama.cpp's `rope_freqs` tensor;
- the tokenizer: tokens with their types, merges, the pre-tokenizer's name where it is one
  llama.cpp knows, special token ids, whether BOS/EOS are added, and the chat template.

Only byte-level BPE tokenizers (Llama 3, SmolLM, GPT-2 style) are written; SentencePiece-style ones
(Llama 2, Mistral) and other architectures are refused with a message. Tensors are converted and
written one at a time, so writing takes little memory beyond the model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peftctl.constants import DTYPES
from peftctl.errors import InputError
from peftctl.models import check_token_ids, encoding_adds

ARCHITECTURES = ("llama",)
_TENSOR_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# gguf's TokenType values
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def check_config(config, name: str = "this model") -> None:
    """An InputError when a model of this config cannot be written as GGUF here."""
    if config.model_type not in ARCHITECTURES:
        raise InputError(
            f"GGUF export writes llama-family models (model_type {', '.join(ARCHITECTURES)}); {name} is "
            f"{config.model_type!r}. Export it with --format merged and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    _rope(config)


def check_tokenizer(tokenizer) -> None:
    """An InputError when this tokenizer cannot be written as GGUF here."""
    _tokenizer_model(tokenizer)


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise InputError(f"GGUF export: rotary scaling {kind!r} is not written here (default, linear and llama3 are)")
    return theta, {**params, "rope_type": kind}


def _tokenizer_model(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("GGUF export needs a fast tokenizer (tokenizer.json)")
    tj = json.loads(backend.to_str())
    model = tj["model"]
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise InputError(
            "GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, GPT-2 style); this one is a "
            f"{model.get('type')} tokenizer{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}. "
            "Export with --format merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return tj


def pre_tokenizer_name(tj: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, when it is one llama.cpp knows by that
    name (its converter identifies them by tokenizing a test string; the same splits are recognised
    here from the tokenizer's own description, which does not depend on the vocabulary)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    plain = {"add_prefix_space": False}
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and _has(steps[0], plain):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True) and _has(steps[1], plain)):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT):
        return "llama-bpe"
    return None


def _has(step: dict, values: dict) -> bool:
    return all(step.get(k, v) == v for k, v in values.items())


def _vocabulary(tj: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's `gpt2` tokenizer model reads them."""
    ids = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        ids[content] = t["id"]
    check_token_ids(ids, vocab_size, "GGUF export")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for text, i in ids.items():
        tokens[i] = text
        special = added.get(text, {}).get("special")
        types[i] = _NORMAL if text not in added else (_CONTROL if special else _USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return tokens, types, merges


def _llama3_rope_factors(params: dict, theta: float, head_dim: int) -> list[float]:
    # The per-frequency divisors of Llama 3's rotary scaling, as llama.cpp reads them (rope_freqs).
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _permute(w, heads: int):
    # llama.cpp's converter: each head's rows (two halves) interleaved as adjacent pairs.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model):
    """(GGUF name, torch tensor) for every tensor of the file, in order."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    state = model.state_dict()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    layer = "model.layers."
    for key, tensor in state.items():
        if key == "model.embed_tokens.weight":
            yield "token_embd.weight", tensor
        elif key == "model.norm.weight":
            yield "output_norm.weight", tensor
        elif key == "lm_head.weight":
            if not tied:
                yield "output.weight", tensor
        elif key.startswith(layer):
            index, rest = key[len(layer):].split(".", 1)
            module, _, kind = rest.rpartition(".")
            if module not in _TENSOR_NAMES:
                raise InputError(f"GGUF export: no llama.cpp name for {key}")
            if module == "self_attn.q_proj":
                tensor = _permute(tensor, heads)
            elif module == "self_attn.k_proj":
                tensor = _permute(tensor, kv_heads)
            yield f"blk.{index}.{_TENSOR_NAMES[module]}.{kind}", tensor
        else:
            raise InputError(f"GGUF export: no llama.cpp name for {key}")


def write(model, tokenizer, path: str | Path, dtype: str = "float16", name: str | None = None) -> dict[str, Any]:
    """Write `model` (a merged llama-family model) and `tokenizer` to `path` as GGUF."""
    import gguf
    import numpy as np
    import torch

    if dtype not in DTYPES:
        raise InputError(f"GGUF export: --dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = model.config
    check_config(config)
    tj = _tokenizer_model(tokenizer)
    theta, rope = _rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qtype = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
             "bfloat16": gguf.GGMLQuantizationType.BF16}[dtype]
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)

    tokens, types, merges = _vocabulary(tj, config.vocab_size)
    pre = pre_tokenizer_name(tj)
    writer.add_tokenizer_model("gpt2")
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = encoding_adds(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def converted(tensor: torch.Tensor) -> np.ndarray:
        tensor = tensor.detach().cpu()
        if tensor.dim() <= 1 or qtype == gguf.GGMLQuantizationType.F32:
            return tensor.float().numpy()
        if qtype == gguf.GGMLQuantizationType.F16:
            return tensor.half().numpy()
        # numpy has no bfloat16: its bits go as int16, which the file stores as BF16
        return tensor.bfloat16().view(torch.int16).numpy()

    extra = []
    if rope["rope_type"] == "llama3":
        extra.append(("rope_freqs.weight", torch.tensor(_llama3_rope_factors(rope, theta, head_dim))))
    # Tensor infos first (shapes and sizes), then the data one tensor at a time.
    plan = [*extra, *_tensors(model)]
    for gguf_name, tensor in plan:
        one_d = tensor.dim() <= 1 or qtype == gguf.GGMLQuantizationType.F32
        element = 4 if one_d else 2
        tensor_qtype = gguf.GGMLQuantizationType.F32 if one_d else qtype
        writer.add_tensor_info(gguf_name, list(tensor.shape), np.dtype(np.float32 if one_d else np.int16),
                               tensor.numel() * element, raw_dtype=tensor_qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in plan:
        writer.write_tensor_data(converted(tensor))
    writer.close()
    return {"tensors": len(plan), "pre_tokenizer": pre, "add_bos_token": add_bos, "vocab_size": config.vocab_size}
