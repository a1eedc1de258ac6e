"""The prompt-learning methods at run time: their encoders, the forward pass and generation.

Prompt tuning and P-tuning put `n = num_virtual_tokens` embeddings P (n, token_dim) before the
token embeddings E(x): the base model reads [P; E(x)], with the attention mask extended by n ones
(and labels, when given, by n IGNORE_INDEX). Prefix tuning gives every layer n extra keys and values
through the model's cache (transformers' `DynamicCache`, passed under the name the model's forward
takes: `cache` in transformers 5.24, `past_key_values` in 5.17 and before; see `cache_key`), so the model
reads x after a prefix it never sees as tokens.

Encoder-decoder models (T5-style; task_type SEQ_2_SEQ_LM, num_transformer_submodules 2), as PEFT's
PeftModelForSeq2SeqLM: prompt tuning and P-tuning create 2n virtual tokens and feed the first n to
the encoder (`encoder_inputs`; the decoder's inputs, labels and logits are unchanged); prefix tuning
gives the decoder's self-attention its keys and values through an `EncoderDecoderCache`
(`seq2seq_prefix_cache`, with PEFT's layer layout), the encoder and the cross-attention unchanged.
Other task types (SEQ_CLS, TOKEN_CLS, ...) are refused: PEFT trains the classification head with them.

The encoders (PEFT's `PromptEmbedding`, `PromptEncoder`, `PrefixEncoder`, with the same parameter
names and order of random draws) live in `AdapterModel.method_state[adapter_name]`; the adapter file
holds their output as one tensor, `prompt_embeddings`, as PEFT saves it:
- prompt tuning: P itself (n, token_dim);
- P-tuning: the encoder's output (n, token_dim), the MLP or LSTM not saved (PEFT's format);
- prefix tuning: the keys and values of every layer, (n, num_layers * 2 * token_dim).

Positions (a deliberate difference from PEFT): the virtual tokens take positions 0 .. n-1 and the
real tokens n + their own position, the position counted over the attention mask (cumsum - 1, as
transformers' `generate` counts it), so a left-padded row reads exactly what it reads unpadded. For
unpadded inputs these are PEFT's positions; PEFT drops `position_ids` for prompt tuning and P-tuning,
so its left-padded rows see the padding shift the real tokens away from the virtual ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import torch
from torch import nn

from peftctl.adapters.hooks import TrainingHooks
from peftctl.constants import IGNORE_INDEX

# The tokenizer that `prompt_tuning_init: TEXT` uses instead of `tokenizer_name_or_path` (a recipe run
# sets it to the run's tokenizer while it creates the adapter).
INIT_TOKENIZER: contextvars.ContextVar[Any] = contextvars.ContextVar("peftctl_prompt_init_tokenizer", default=None)
SAVED_KEY = "prompt_embeddings"


@contextlib.contextmanager
def init_tokenizer(tokenizer):
    """Within this block `prompt_tuning_init: TEXT` tokenizes its text with `tokenizer`."""
    token = INIT_TOKENIZER.set(tokenizer)
    try:
        yield
    finally:
        INIT_TOKENIZER.reset(token)


# ---- the config's model-dependent fields (PEFT's `_prepare_prompt_learning_config`) ------------------


def _text_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("prompt-learning methods need a transformers model (one with a config)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = text.to_dict()
    if getattr(text, "num_hidden_layers", None) is not None:
        d["num_hidden_layers"] = text.num_hidden_layers
    return d


def _find(d: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    return next((d[key] for key in keys if d.get(key) is not None), None)


def _agreed(field: str, given: int | None, model: int | None, how: str = "") -> int:
    """The model's value of `field`; one set in the config must be it (PEFT would keep a differing
    one, which breaks the forward or is recorded wrong, or, for prefix tuning on a grouped-query
    model, overwrite it silently)."""
    if given is not None and model is not None and given != model:
        raise ValueError(f"{field} {given}: this model's is {model}{how}; leave {field} unset (taken from the model)")
    if model is None and given is None:
        raise ValueError(f"cannot tell {field} from the model's config; set {field} in the adapter config")
    return model if model is not None else given


def with_model_dims(config, model: nn.Module):
    """`config` with token_dim, num_layers, num_attention_heads, num_transformer_submodules (and
    encoder_hidden_size where the method has it) filled in from the model, as PEFT records them.
    Prefix tuning on a grouped-query model: token_dim = head_dim * num_key_value_heads and
    num_attention_heads = num_key_value_heads (the keys' and values' width, PEFT's rule).

    A token_dim, num_layers or num_attention_heads set in the config that differs from the model's
    (as just defined) is a ValueError: PEFT keeps such a value (fills only unset ones), which gives
    embeddings or keys of the wrong width (an error in the forward) or records a wrong number, and on
    a grouped-query model its prefix tuning replaces token_dim and num_attention_heads silently."""
    d = _text_config(model)
    encoder_decoder = is_encoder_decoder(model)
    task = str(getattr(config.task_type, "value", config.task_type)) if config.task_type is not None else None
    if task not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ValueError(f"{config.method} is implemented here for task_type CAUSAL_LM and SEQ_2_SEQ_LM, not {task} "
                         "(PEFT's classification variants also train the model's head; use a LoRA-family method)")
    if encoder_decoder != (task == "SEQ_2_SEQ_LM"):
        raise ValueError(f"{config.method} on an encoder-decoder model needs task_type SEQ_2_SEQ_LM, and "
                         "task_type SEQ_2_SEQ_LM an encoder-decoder model (T5-style); this model is "
                         f"{'encoder-decoder' if encoder_decoder else 'decoder-only'}, task_type {task}")
    submodules = config.num_transformer_submodules or (2 if encoder_decoder else 1)
    if submodules != (2 if encoder_decoder else 1):
        raise ValueError(f"num_transformer_submodules {submodules}: it is 2 for an encoder-decoder model and 1 for "
                         "a decoder-only one; leave it unset")
    update: dict[str, Any] = {"num_transformer_submodules": submodules}
    layers = _agreed("num_layers", config.num_layers, _find(d, ("num_hidden_layers", "num_layers", "n_layer")))
    update["num_layers"] = layers
    decoder_layers = d.get("num_decoder_layers") or layers
    if encoder_decoder and config.method == "prefix_tuning" and decoder_layers != layers:
        raise ValueError(f"prefix tuning gives each of num_layers {layers} decoder layers a prefix (PEFT's layout); "
                         f"this model's decoder has {decoder_layers} layers")
    width = _find(d, ("hidden_size", "n_embd", "d_model"))
    heads = _find(d, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    how = ""
    if config.method == "prefix_tuning" and d.get("num_key_value_heads") is not None:
        head_dim = d.get("head_dim") or (width or config.token_dim) // (heads or config.num_attention_heads)
        width, heads = head_dim * d["num_key_value_heads"], d["num_key_value_heads"]
        how = " (prefix tuning: the keys' and values' width, head_dim x num_key_value_heads, as PEFT records it)"
    head_dim = d.get("d_kv")  # T5's attention width per head, which need not be d_model / num_heads
    if config.method == "prefix_tuning" and head_dim and heads and head_dim * heads != width:
        # The keys' and values' width, which a config must give (PEFT would take d_model and fail).
        if config.token_dim != head_dim * heads:
            raise ValueError(f"prefix tuning's keys and values are num_attention_heads x token_dim / "
                             f"num_attention_heads wide: {heads} x {(config.token_dim or width) // heads} here, but "
                             f"this model's attention is {heads} x {head_dim}; set token_dim {head_dim * heads}")
        width = head_dim * heads
    token_dim = _agreed("token_dim", config.token_dim, width, how)
    update["token_dim"] = token_dim
    update["num_attention_heads"] = _agreed("num_attention_heads", config.num_attention_heads, heads, how)
    if "encoder_hidden_size" in type(config).model_fields and config.encoder_hidden_size is None:
        update["encoder_hidden_size"] = token_dim
    return config.model_copy(update=update)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether `model` is a transformers encoder-decoder (T5-style: PEFT's SEQ_2_SEQ_LM)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def word_embeddings(model: nn.Module) -> nn.Module:
    """The model's input embedding layer (PEFT searches for the parameter of vocabulary size: the same
    module in the models peftctl trains)."""
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError("the model has no input embeddings for prompt tuning")
    return emb


# ---- the encoders (PEFT's modules, parameter for parameter) -------------------------------------------


class PromptEmbedding(nn.Module):
    """Prompt tuning's virtual tokens: `embedding` (n * submodules, token_dim), float32.

    Init (`prompt_tuning_init`): RANDOM, torch.nn.Embedding's N(0, 1); SAMPLE_VOCAB, the word
    embeddings of `torch.randint(0, vocab, (n,))`; TEXT, the word embeddings of the init text's
    token ids, repeated to n then cut (PEFT's `PromptEmbedding`; no init when loading a saved one).
    """

    reparameterized = False

    def __init__(self, config, word_embeddings: nn.Module):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        elif config.prompt_tuning_init == "TEXT":
            ids = torch.tensor(_repeat_to(_init_text_ids(config), total), dtype=torch.long)
        else:
            return
        with torch.no_grad():
            weight = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(weight.to(self.embedding.weight.device))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _init_text_ids(config) -> list[int]:
    tokenizer = INIT_TOKENIZER.get()
    if tokenizer is None:
        if not config.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init TEXT needs tokenizer_name_or_path (a recipe uses its own tokenizer)")
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as PEFT: a saved config must not run code
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError("prompt_tuning_init_text gives no tokens")
    return ids


def _repeat_to(ids: list[int], total: int) -> list[int]:
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEncoder(nn.Module):
    """P-tuning's encoder (Liu et al. 2021, "GPT Understands, Too", §3): embeddings (n, token_dim)
    reparameterized by an MLP (Linear-ReLU-Linear-ReLU-Linear through encoder_hidden_size) or a
    bidirectional LSTM then Linear-ReLU-Linear; PEFT's `PromptEncoder`. In inference mode (a loaded
    adapter) only `embedding`, holding the saved output, exists."""

    def __init__(self, config):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, dim)
        self.reparameterized = not config.inference_mode
        if not self.reparameterized:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        if not self.reparameterized:
            return x
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning's encoder (Li & Liang 2021, "Prefix-Tuning", §4.3): the keys and values of every
    layer, (n, num_layers * 2 * token_dim), held directly, or (`prefix_projection`) made from
    embeddings (n, token_dim) by Linear-Tanh-Linear through encoder_hidden_size; PEFT's `PrefixEncoder`
    (`init_weights: zero` zeroes the last layer, or the embedding)."""

    def __init__(self, config):
        super().__init__()
        dim, layers = config.token_dim, config.num_layers
        self.reparameterized = config.prefix_projection and not config.inference_mode
        if self.reparameterized:
            self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
            self.transform = nn.Sequential(nn.Linear(dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, layers * 2 * dim))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, layers * 2 * dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.reparameterized else x


def make_encoder(model: nn.Module, config) -> nn.Module:
    """The adapter's encoder, created on the CPU in PEFT's order of draws (a seed gives PEFT's
    weights), then moved to the input embeddings' device (float32)."""
    emb = word_embeddings(model)
    device = emb.weight.device
    if device.type == "meta" and config.method == "prompt_tuning":
        config = config.model_copy(update={"inference_mode": True})  # shapes only: no values to start from
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        if config.method == "prompt_tuning":
            encoder = PromptEmbedding(config, emb)
        elif config.method == "p_tuning":
            encoder = PromptEncoder(config)
        else:
            encoder = PrefixEncoder(config)
    return encoder.to(device)


def total_tokens(config) -> int:
    n = config.num_virtual_tokens
    return n if config.method == "prefix_tuning" else n * config.num_transformer_submodules


def encoder_output(encoder: nn.Module, config) -> torch.Tensor:
    """What the encoder feeds the model, (total tokens, width), float32, with gradients when training."""
    indices = torch.arange(total_tokens(config), device=encoder.embedding.weight.device)
    return encoder(indices) if encoder.reparameterized else encoder.embedding.weight


# ---- the forward pass --------------------------------------------------------------------------------


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over a 2D attention mask (cumsum - 1; masked positions 1), as transformers' generate."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _prefix_layers(config, output: torch.Tensor, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`output` (n, num_layers * 2 * token_dim) split as PEFT splits it: viewed as (n, layers * 2,
    heads, head_dim), then permuted to layers * 2 tensors (batch, heads, n, head_dim), keys and
    values alternating, cast to `dtype`; one (keys, values) pair a layer."""
    n, heads = config.num_virtual_tokens, config.num_attention_heads
    kv = output.to(dtype).view(n, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (layers * 2, batch, heads, n, hd)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]


def prefix_cache(config, output: torch.Tensor, batch: int, dtype: torch.dtype, cache=None):
    """The per-layer keys and values of the prefix (`_prefix_layers`) in a transformers cache:
    `cache` (an empty DynamicCache that generate made) filled, or a new DynamicCache."""
    from transformers import DynamicCache

    layers = _prefix_layers(config, output, batch, dtype)
    if cache is None:
        return DynamicCache(layers)
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def seq2seq_prefix_cache(config, output: torch.Tensor, batch: int, dtype: torch.dtype, cache=None):
    """An encoder-decoder's prefix as PEFT 0.21 delivers it: an `EncoderDecoderCache` whose
    self-attention cache holds, for decoder layer i, the keys and values stored in the file for
    layer (2 i) mod num_layers, and whose cross-attention cache is empty (computed from the encoder's
    output as without an adapter; the encoder gets no prefix). PEFT doubles the per-layer tensors
    along the layer axis and regroups them four at a time (self keys, self values, cross keys, cross
    values), then discards the cross-attention part: with an even num_layers half of the stored
    layers are never read (they get no gradient), as in PEFT. `cache`: generate's empty
    EncoderDecoderCache, whose self-attention cache is filled; else a new one."""
    from transformers import DynamicCache, EncoderDecoderCache

    layers = _prefix_layers(config, output, batch, dtype)
    L = config.num_layers
    own = [layers[(2 * i) % L] for i in range(L)]
    if cache is None:
        return EncoderDecoderCache(DynamicCache(own), DynamicCache())
    for i, (k, v) in enumerate(own):
        cache.self_attention_cache.update(k, v, i)
    return cache


def cache_key(model: nn.Module) -> str:
    """The name under which `model`'s forward takes its KV cache: `cache` (transformers 5.24, which
    renamed it after 5.17) or `past_key_values` (5.17 and before). Read from the forward's signature, the name the model
    acts on: the other name lands in `**kwargs` and is silently ignored (a prefix never applied).
    Raises ValueError when the forward takes neither."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`); "
                     "prompt-learning methods need one")


def model_inputs(peft_model, config, encoder: nn.Module, *, input_ids=None, inputs_embeds=None,
                 attention_mask=None, position_ids=None, labels=None, first: bool = True, cache=None):
    """The base model's inputs for a prompt-learning adapter: `first` is a forward that starts a
    sequence (training, evaluation, generation's prefill); later generation steps only extend the
    mask and shift the positions. Returns a dict of keyword arguments for the base model."""
    base = peft_model.base_model.model
    n = config.num_virtual_tokens
    ref = input_ids if input_ids is not None else inputs_embeds
    batch = ref.shape[0]
    out: dict[str, Any] = {}
    prefix = config.method == "prefix_tuning"
    if position_ids is not None:
        position_ids = position_ids + n  # the real tokens come after the virtual ones
    elif first and attention_mask is not None and attention_mask.dim() == 2:
        position_ids = _positions(attention_mask) + n  # counted over the mask: padding shifts nothing
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = torch.cat((attention_mask.new_ones((batch, n)), attention_mask), dim=1)
    if first and not prefix and position_ids is not None:
        virtual = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
        position_ids = torch.cat((virtual.expand(*position_ids.shape[:-1], n), position_ids), dim=-1)
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
    if position_ids is not None:
        out["position_ids"] = position_ids
    dtype = _model_dtype(base)
    if prefix:
        if first:
            out[cache_key(base)] = prefix_cache(config, encoder_output(encoder, config), batch, dtype, cache)
        out["input_ids"], out["inputs_embeds"] = input_ids, inputs_embeds
        if labels is not None:
            out["labels"] = labels
        return out
    if not first:
        out["input_ids"], out["inputs_embeds"] = input_ids, inputs_embeds
        return out
    if inputs_embeds is None:
        inputs_embeds = word_embeddings(base)(input_ids)
    prompts = encoder_output(encoder, config).to(inputs_embeds.dtype)
    prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
    out["inputs_embeds"] = torch.cat((prompts, inputs_embeds), dim=1)
    if labels is not None:
        out["labels"] = torch.cat((labels.new_full((batch, prompts.shape[1]), IGNORE_INDEX), labels), dim=1)
    return out


def cache_positions(config, positions: torch.Tensor, first: bool) -> torch.Tensor:
    """`generate`'s `cache_position` (the indices in the KV cache of this step's tokens, (seq,) int64),
    shifted past the n virtual tokens the cache holds before the real ones; at prompt tuning's and
    P-tuning's first step the virtual tokens' own 0 .. n-1 come first, as they are fed with it.
    transformers 4.x passes `cache_position` to every model, which builds its attention mask from it
    (unshifted, the mask misses the virtual tokens' columns; T5's decoder also its relative positions);
    5.24 only to remote-code models whose forward takes one. `generate` and `seq2seq_generate` (the
    decoder's cache, behind the prefix) shift whichever they are given: they follow the installed version."""
    n = config.num_virtual_tokens
    shifted = positions + n
    if first and config.method != "prefix_tuning":
        shifted = torch.cat((torch.arange(n, device=positions.device, dtype=positions.dtype), shifted))
    return shifted


def _model_dtype(model: nn.Module) -> torch.dtype:
    return word_embeddings(model).weight.dtype


# PEFT's positional arguments of PeftModelForCausalLM.forward and PeftModelForSeq2SeqLM.forward.
_FORWARD_ARGS = ("input_ids", "attention_mask", "inputs_embeds", "labels")
_SEQ2SEQ_FORWARD_ARGS = ("input_ids", "attention_mask", "inputs_embeds", "decoder_input_ids",
                         "decoder_attention_mask", "decoder_inputs_embeds", "labels")


def forward(peft_model, config, encoder, args, kwargs):
    """PeftModelForCausalLM.forward for a prompt-learning adapter: the base model's output over the
    virtual tokens and the real ones (logits (batch, n + seq, vocab) for prompt tuning and P-tuning,
    as PEFT returns them; `logits_to_keep` counts over that whole sequence). An encoder-decoder
    model: `seq2seq_forward`."""
    seq2seq = is_encoder_decoder(peft_model.base_model.model)
    for name, value in zip(_SEQ2SEQ_FORWARD_ARGS if seq2seq else _FORWARD_ARGS, args, strict=False):
        kwargs[name] = value
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise ValueError("a prompt-learning adapter starts every forward from its own virtual tokens; "
                         "pass no cache (generate() handles the cache)")
    kwargs.pop("token_type_ids", None)  # PEFT drops them for prompt learning too
    if seq2seq:
        return seq2seq_forward(peft_model, config, encoder, kwargs)
    inputs = model_inputs(peft_model, config, encoder, input_ids=kwargs.pop("input_ids", None),
                          inputs_embeds=kwargs.pop("inputs_embeds", None),
                          attention_mask=kwargs.pop("attention_mask", None),
                          position_ids=kwargs.pop("position_ids", None), labels=kwargs.pop("labels", None))
    return peft_model.base_model.model(**inputs, **kwargs)


# ---- encoder-decoder models (T5-style; PEFT's PeftModelForSeq2SeqLM) ---------------------------------


def _batch_size(kwargs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if kwargs.get(name) is not None:
            return kwargs[name].shape[0]
    outputs = kwargs.get("encoder_outputs")
    if outputs is not None:
        return outputs[0].shape[0]
    raise ValueError("no input to tell the batch size from: pass input_ids")


def encoder_inputs(config, encoder: nn.Module, model: nn.Module, input_ids=None, inputs_embeds=None,
                   attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs_embeds (batch, n + seq, d_model), attention_mask (batch, n + seq) or None) of an
    encoder-decoder's encoder with prompt tuning or P-tuning: the first n of the encoder's 2n outputs
    (PEFT creates num_virtual_tokens * num_transformer_submodules and feeds the first n to the encoder,
    the rest to nothing) before the token embeddings, the mask extended by n ones.

    Where a row's mask starts with padding (left padding) its virtual tokens go after the padding,
    just before its first real token (a deliberate difference from PEFT, which puts them first): T5's
    relative position bias then sees the distances a row has alone, so a padded row reads what it
    reads unpadded, left padding or right, as T5 without an adapter does. Rows without leading
    padding (right-padded, unpadded) are PEFT's [virtual; tokens] exactly."""
    if inputs_embeds is None:
        inputs_embeds = word_embeddings(model)(input_ids)
    n = config.num_virtual_tokens
    batch = inputs_embeds.shape[0]
    prompts = encoder_output(encoder, config)[:n].to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    embeds = torch.cat((prompts, inputs_embeds), dim=1)
    if attention_mask is None:
        return embeds, None
    if attention_mask.dim() != 2:
        raise ValueError("a prompt-learning adapter extends a 2D attention mask (batch, seq); got "
                         f"{attention_mask.dim()} dimensions")
    mask = torch.cat((attention_mask.new_ones((batch, n)), attention_mask), dim=1)
    lead = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # each row's leading padding
    j = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    # Position j of the result takes: padding (j < lead) from n + j, a virtual token from j - lead,
    # a real token from j (its own place in [virtual; tokens]).
    index = torch.where(j < lead, j + n, torch.where(j < lead + n, j - lead, j))
    embeds = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return embeds, mask.gather(1, index)


def _extend_decoder_mask(kwargs: dict[str, Any], n: int) -> None:
    mask = kwargs.get("decoder_attention_mask")
    if mask is not None and mask.dim() == 2:  # the prefix's keys come before the decoder's own
        kwargs["decoder_attention_mask"] = torch.cat((mask.new_ones((mask.shape[0], n)), mask), dim=1)


def seq2seq_forward(peft_model, config, encoder, kwargs):
    """PeftModelForSeq2SeqLM.forward for a prompt-learning adapter. Prompt tuning, P-tuning: the
    encoder reads the virtual tokens (`encoder_inputs`), the decoder is unchanged (logits (batch,
    target length, vocab), labels as given). Prefix tuning: the decoder's self-attention reads the
    prefix (`seq2seq_prefix_cache`), decoder_attention_mask (when given) extended by n ones; the
    encoder is unchanged."""
    base = peft_model.base_model.model
    n = config.num_virtual_tokens
    if config.method == "prefix_tuning":
        _extend_decoder_mask(kwargs, n)
        kwargs[cache_key(base)] = seq2seq_prefix_cache(config, encoder_output(encoder, config), _batch_size(kwargs),
                                                       _model_dtype(base))
        return base(**kwargs)
    if kwargs.get("encoder_outputs") is not None:
        raise ValueError(f"{config.method}: the encoder reads the virtual tokens; pass input_ids, not encoder_outputs")
    embeds, mask = encoder_inputs(config, encoder, base, kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None),
                                  kwargs.pop("attention_mask", None))
    return base(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def seq2seq_generate(peft_model, config, encoder, args, kwargs):
    """The base model's generate for an encoder-decoder. Prompt tuning, P-tuning: generate from the
    encoder's inputs with the virtual tokens (`encoder_inputs`). Prefix tuning: the decoder's first
    step (its self-attention cache empty) gets the prefix in generate's own cache, later steps reuse
    it; the encoder runs as without an adapter. Returns what transformers' generate returns for an
    encoder-decoder (the decoder's tokens, from its start token)."""
    base = peft_model.base_model.model
    n = config.num_virtual_tokens
    if args:
        if "inputs" in kwargs or "input_ids" in kwargs:
            raise ValueError("generate() got the input ids twice")
        kwargs["input_ids"], args = args[0], args[1:]
    if "inputs" in kwargs:
        kwargs["input_ids"] = kwargs.pop("inputs")
    if config.method != "prefix_tuning":
        if kwargs.get("input_ids") is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate() with a prompt-learning adapter takes input_ids, not inputs_embeds")
        if kwargs.get("encoder_outputs") is not None:
            raise ValueError(f"{config.method}: the encoder reads the virtual tokens; pass input_ids, "
                             "not encoder_outputs")
        embeds, mask = encoder_inputs(config, encoder, base, kwargs.pop("input_ids"), None,
                                      kwargs.pop("attention_mask", None))
        if mask is not None:
            kwargs["attention_mask"] = mask
        return base.generate(*args, inputs_embeds=embeds, **kwargs)

    from transformers import EncoderDecoderCache

    key = cache_key(base)

    def prepare(inputs: dict[str, Any]) -> dict[str, Any]:
        cache = inputs.get(key)
        # use_cache=False: every step reads the whole decoder sequence, so it gets a fresh prefix (T5
        # returns the cache it was given even then, and generate hands it to the next step).
        fresh = inputs.get("use_cache") is False
        if fresh or cache is None or cache.get_seq_length() == 0:
            ref = inputs.get("decoder_input_ids")
            ref = ref if ref is not None else inputs["decoder_inputs_embeds"]
            given = cache if isinstance(cache, EncoderDecoderCache) and not fresh else None
            inputs[key] = seq2seq_prefix_cache(config, encoder_output(encoder, config), ref.shape[0], _model_dtype(base),
                                               given)
        _extend_decoder_mask(inputs, n)
        if inputs.get("cache_position") is not None:  # transformers 4.x: past the prefix, as 5.x counts
            inputs["cache_position"] = cache_positions(config, inputs["cache_position"], False)
        return inputs

    return _generate_with(base, prepare, args, kwargs)


def _generate_with(base, prepare, args, kwargs):
    """base.generate(*args, **kwargs) with `prepare` applied to what the model's own
    prepare_inputs_for_generation returns at each step."""
    original = base.prepare_inputs_for_generation

    @functools.wraps(original)  # generate checks its keyword arguments against this signature
    def prepare_inputs(*a, **kw):
        return prepare(original(*a, **kw))

    own = vars(base).get("prepare_inputs_for_generation")  # an instance attribute someone else set
    base.prepare_inputs_for_generation = prepare_inputs
    try:
        return base.generate(*args, **kwargs)
    finally:
        if own is None:
            del base.prepare_inputs_for_generation
        else:
            base.prepare_inputs_for_generation = own


def generate(peft_model, config, encoder, args, kwargs):
    """The base model's generate with the prompt applied on the first step only: the prefill reads
    the virtual tokens (or the prefix cache), later steps extend the mask and shift the positions
    and reuse the cache. Returns what transformers' generate returns (prompt ids, then new tokens).
    An encoder-decoder model: `seq2seq_generate`."""
    base = peft_model.base_model.model
    if is_encoder_decoder(base):
        return seq2seq_generate(peft_model, config, encoder, args, kwargs)
    key = cache_key(base)  # `cache` or `past_key_values`, by the transformers version

    def prepare(inputs: dict[str, Any]) -> dict[str, Any]:
        cache = inputs.get(key)
        first = cache is None or cache.get_seq_length() == 0
        prepared = model_inputs(peft_model, config, encoder, input_ids=inputs.pop("input_ids", None),
                                inputs_embeds=inputs.pop("inputs_embeds", None),
                                attention_mask=inputs.pop("attention_mask", None),
                                position_ids=inputs.pop("position_ids", None), first=first,
                                cache=cache if first else None)
        inputs.update(prepared)
        if inputs.get("cache_position") is not None:
            inputs["cache_position"] = cache_positions(config, inputs["cache_position"], first)
        if first and config.method != "prefix_tuning":
            inputs.pop("input_ids", None)
        return inputs

    if kwargs.get("inputs_embeds") is not None and config.method != "prefix_tuning":
        raise ValueError("generate() with a prompt-learning adapter takes input_ids, not inputs_embeds")
    return _generate_with(base, prepare, args, kwargs)


# ---- saving and loading ------------------------------------------------------------------------------


def saved_tensors(encoder: nn.Module, config) -> dict[str, torch.Tensor]:
    """{"prompt_embeddings": tensor} as PEFT saves it: the live embedding when it is the output (it
    then also loads in place), else the encoder's output (P-tuning, projected prefix), computed."""
    if not encoder.reparameterized:
        return {SAVED_KEY: encoder.embedding.weight}
    was = encoder.training
    encoder.eval()  # the output without dropout (and without drawing from the training's random stream)
    try:
        with torch.no_grad():
            return {SAVED_KEY: encoder_output(encoder, config).detach()}
    finally:
        encoder.train(was)


# ---- the method hooks the adapter core calls (`registry.optional`), shared by the three methods -----


def dispatch(module, adapter_name, config, module_name="", **state):
    raise TypeError(f"{config.method} adapts no module (it changes the model's input); {module_name} was targeted")


def before_inject(model, adapter_name: str, config, targets: list[str]) -> nn.Module:
    """The adapter's encoder (kept in `model.method_state[adapter_name]`)."""
    return make_encoder(model.model, config)


def model_tensors(model, adapter_name: str) -> dict[str, torch.Tensor]:
    encoder = model.method_state[adapter_name]
    if getattr(encoder, "pending_output", None) is not None:
        return {}  # a file's output waits for the encoder's own state (see `before_load`)
    return saved_tensors(encoder, model.peft_config[adapter_name])


def before_load(model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """A saved file holds the encoder's output. A trainable encoder that computes its output (P-tuning,
    a projected prefix) cannot take it: the output is kept aside until the encoder's own weights
    arrive (a resumed run's checkpoint holds them with its training hooks' state, and checks that they
    give this output); used before that, the adapter refuses to run (PEFT instead feeds the saved
    output through a freshly initialised encoder)."""
    encoder = model.method_state[adapter_name]
    if encoder.reparameterized and SAVED_KEY in tensors:
        encoder.pending_output = tensors.pop(SAVED_KEY)


def check_ready(encoder: nn.Module, config) -> None:
    if getattr(encoder, "pending_output", None) is not None:
        raise ValueError(
            f"this {config.method} adapter was loaded trainable from a file, which holds only its encoder's output, "
            "not the encoder; load it for inference (is_trainable=False), or resume its run from a checkpoint")


class EncoderState(TrainingHooks):
    """Training hooks of the methods whose encoder is more than its output (P-tuning, a projected
    prefix): checkpoints save the encoder's weights (`adapter_hooks.pt`), which the adapter file does
    not hold, so that a resumed run continues the same encoder."""

    def __init__(self, model, adapter_name: str):
        self.model, self.adapter_name = model, adapter_name

    def state_dict(self) -> dict[str, Any]:
        encoder = self.model.method_state[self.adapter_name]
        return {"encoder": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        encoder = self.model.method_state[self.adapter_name]
        encoder.load_state_dict(state["encoder"])
        pending = getattr(encoder, "pending_output", None)
        encoder.pending_output = None
        if pending is not None:
            config = self.model.peft_config[self.adapter_name]
            out = saved_tensors(encoder, config)[SAVED_KEY]
            # The file holds this computation's float32 result; on another device its sums may round
            # differently (relative 1e-6), far inside 1e-3, while another encoder differs by order 1.
            if not torch.allclose(out, pending.to(out), rtol=1e-3, atol=1e-5):
                raise ValueError("the checkpoint's encoder state does not give the adapter file's output")


def training_hooks(model, adapter_name: str, config):
    encoder = model.method_state[adapter_name]
    return EncoderState(model, adapter_name) if encoder.reparameterized else None
