"""Prompt tuning, P-tuning and prefix tuning on an encoder-decoder (T5ForConditionalGeneration,
PEFT's SEQ_2_SEQ_LM) against Hugging Face PEFT 0.21 (a test-only reference): the same weights and
logits from the same seed, adapters moving both ways with identical logits and greedy generations,
generation with a KV cache equal to greedy decoding by full forwards, padded batches (left or right)
equal to their rows alone, the prefix only in the decoder's self-attention and the virtual tokens only
in the encoder, training moving the prompt parameters only; and the refusals.

Tolerances: float32 throughout. Where both libraries run the same operations in the same order the
logits are bit-identical. Elsewhere they differ by a few float32 roundings of the adapter's output
(relative 6e-8 each): a projected prefix or a P-tuning encoder runs its MLP on another batch shape
than PEFT's (another matmul blocking), a loaded P-tuning file holds the output PEFT computed once, a
padded row runs the attention's sums over a longer (masked) row. This tiny T5 amplifies such
perturbations (sharp attention, see `tiny_t5`): moving every adapter weight by one rounding moves its
logits by up to 1e-5 of the largest (measured over random perturbations), so `close` allows 2e-4 of
the largest logit (of order 10), while the adapter itself moves them by order 1. Greedy tokens are
compared exactly (a flip needs two top logits within 2e-3 of each other; the inputs are fixed).

The generation oracle is greedy decoding by repeated full forwards (no cache) through PEFT's forward
or peftctl's: PEFT 0.21's own generate() for prefix tuning looks for `past_key_values`, which
transformers 5.24's loop passes as `cache`, so on 5.24 it decodes without the prefix.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import CASES as DECODER_CASES

import peftctl
from peftctl import PeftModel, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the prompt-learning reference; install the test extra")



def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= 2e-4 * float(b.abs().max())

IDS = torch.tensor([[5, 17, 30, 41, 7, 1], [9, 8, 5, 1, 0, 0]])  # right-padded, as T5's tokenizer pads
MASK = (IDS != 0).long()

# The decoder-only tests' configs (test_prompt.py), with 3 sampled vocabulary tokens.
CASES = {**DECODER_CASES, "prompt-vocab": ("PromptTuningConfig", {"num_virtual_tokens": 3,
                                                                  "prompt_tuning_init": "SAMPLE_VOCAB"})}


def tiny_t5(layers: int = 2):
    """A 2-layer (or `layers`) T5ForConditionalGeneration: vocabulary 64, d_model 32, 4 heads of 8,
    initialised twice as wide as T5's default and its relative position biases 5x (T5's default
    init gives this tiny model one repeated token and attention nearly blind to position; here
    greedy answers vary and where a token sits changes what the encoder computes)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="relu",
                      dropout_rate=0.0, initializer_factor=2.0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5)
    return model


def _both(case, layers=2, seed=1):
    """The same config in both libraries, each on a fresh copy of the same base, from one seed."""
    name, kw = CASES[case]
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(tiny_t5(layers), getattr(peft, name)(task_type="SEQ_2_SEQ_LM", **kw))
    torch.manual_seed(seed)
    ours = get_peft_model(tiny_t5(layers), getattr(peftctl, name)(task_type="SEQ_2_SEQ_LM", **kw))
    return ours.eval(), theirs.eval()


def _perturbed(model):
    """Trained-looking weights: every trainable tensor moved away from its init."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _logits(model, ids=IDS, mask=MASK, decoder=None):
    decoder = torch.tensor([[0, 4, 6, 9], [0, 5, 5, 2]])[: ids.shape[0]] if decoder is None else decoder
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits


def _greedy_without_cache(model, ids=IDS, mask=MASK, steps=6):
    """The oracle: each new decoder token from a full forward over everything so far (no cache)."""
    out = torch.zeros((ids.shape[0], 1), dtype=torch.long)
    for _ in range(steps):
        out = torch.cat((out, _logits(model, ids, mask, out)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


def _generate(model, ids=IDS, mask=MASK, steps=6, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, **kwargs)


LAYER_CASES = [(2, c) for c in CASES] + [(3, "prefix"), (3, "prefix-projection")]


@pytest.mark.parametrize(("layers", "case"), LAYER_CASES, ids=[f"{n}layers-{c}" for n, c in LAYER_CASES])
def test_same_seed_same_weights_logits_and_counts(layers, case):
    """The same seed gives PEFT's weights and logits, an odd number of layers too (PEFT's prefix
    layout reads the stored layer (2 i) mod num_layers for decoder layer i)."""
    ours, theirs = _both(case, layers)
    mine, peft_state = ours.base_model.method_state["default"].state_dict(), theirs.prompt_encoder["default"].state_dict()
    assert mine.keys() == peft_state.keys() and all(torch.equal(mine[k], peft_state[k]) for k in mine)
    a, b, base = _logits(ours), _logits(theirs), _logits(ours.get_base_model())
    assert a.shape == b.shape == base.shape  # the decoder's positions only
    assert close(a, b)
    assert (a - base).abs().max() > 1e-3  # the adapter changes the output
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.peft_config["default"].num_transformer_submodules == 2
    with ours.disable_adapter():
        assert torch.equal(_logits(ours), base)


@pytest.mark.parametrize("case", [c for c in CASES if c != "prompt-vocab"])
def test_adapters_move_both_ways_with_identical_logits_and_generations(case, tmp_path):
    ours, theirs = _both(case)
    _perturbed(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path / "theirs")
    assert close(_logits(loaded), _logits(theirs))
    oracle = _greedy_without_cache(theirs)
    assert torch.equal(_generate(loaded), oracle)
    assert not torch.equal(oracle, _greedy_without_cache(tiny_t5()))  # the adapter changes the answers

    # ... and the reverse: peftctl's file (from its own trained weights) in PEFT.
    _perturbed(ours).save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(config) == set(theirs_config) - {"peft_version", "auto_mapping"}
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in theirs_config.items() if k in config and k != "base_model_name_or_path"}
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == \
        {k: v.shape for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}
    back = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path / "ours").eval()
    assert close(_logits(back), _logits(ours))
    assert torch.equal(_greedy_without_cache(back), _generate(ours))


@pytest.mark.parametrize("case", ["prompt-random", "ptuning-lstm", "prefix"])
def test_generation_with_cache_and_padding_either_side(case):
    """generate() (KV cache, or none) is greedy decoding by full forwards; a batch of sources of different
    lengths, right- or left-padded, gives each row what it gives alone (T5's relative positions:
    the virtual tokens go right before a row's first real token)."""
    ours, _ = _both(case)
    _perturbed(ours)
    expected = _greedy_without_cache(ours)
    assert torch.equal(_generate(ours), expected)
    # Without a cache every step reads the whole decoder sequence (and a fresh prefix); beams too.
    assert torch.equal(_generate(ours, use_cache=False), expected)
    assert torch.equal(_generate(ours, num_beams=2), _generate(ours, num_beams=2, use_cache=False))
    short = IDS[1, :4]
    alone = _generate(ours, short[None], torch.ones(1, 4, dtype=torch.long))[0]
    assert torch.equal(alone, expected[1])  # right padding: the row as it is alone
    left = torch.stack((IDS[0], torch.cat((torch.zeros(2, dtype=torch.long), short))))
    left_mask = (left != 0).long()
    batch = _generate(ours, left, left_mask)
    assert torch.equal(batch, expected)
    decoder = torch.tensor([[0, 4, 6, 9]])
    padded = _logits(ours, left, left_mask, decoder.expand(2, -1))[1]
    assert close(padded, _logits(ours, short[None], torch.ones(1, 4, dtype=torch.long), decoder)[0])


@pytest.mark.parametrize("case", ["prompt-random", "prefix"])
def test_virtual_tokens_and_prefix_only_where_they_belong(case):
    """Prompt tuning changes what the encoder reads (n more positions) and nothing in the decoder's
    inputs; prefix tuning leaves the encoder's output as it is and extends the decoder's
    self-attention by n keys (its cache after the forward: n + target length; the cross-attention's
    keys are the encoder's output, source length)."""
    ours, _ = _both(case)
    base = ours.get_base_model()
    decoder = torch.tensor([[0, 4, 6, 9], [0, 5, 5, 2]])
    with torch.no_grad():
        out = ours(input_ids=IDS, attention_mask=MASK, decoder_input_ids=decoder, use_cache=True)
        plain = base(input_ids=IDS, attention_mask=MASK, decoder_input_ids=decoder)
    n = ours.peft_config["default"].num_virtual_tokens
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    if case == "prefix":
        with torch.no_grad():  # a decoder mask covers the decoder's tokens; the prefix is always read
            masked = ours(input_ids=IDS, attention_mask=MASK, decoder_input_ids=decoder,
                          decoder_attention_mask=torch.ones_like(decoder))
        assert close(masked.logits, out.logits)
        assert torch.equal(out.encoder_last_hidden_state, plain.encoder_last_hidden_state)
        assert cache.self_attention_cache.get_seq_length() == n + 4
        assert cache.cross_attention_cache.layers[0].keys.shape[-2] == IDS.shape[1]
    else:
        assert out.encoder_last_hidden_state.shape[1] == n + IDS.shape[1]
        assert cache.get_seq_length() == 4 and cache.cross_attention_cache.layers[0].keys.shape[-2] == n + IDS.shape[1]
    assert ours.prepended_tokens() == 0  # the logits are the decoder's, one a target position


@pytest.mark.parametrize("case", ["prompt-random", "ptuning-mlp", "prefix-projection"])
def test_training_lowers_the_loss_through_the_prompt_parameters_only(case):
    """Teacher-forced cross-entropy (labels given, as peftctl's seq2seq loss feeds them): the same
    loss as PEFT's forward, a few AdamW steps lower it, gradients reach the adapter's encoder only
    and the base model does not move."""
    ours, theirs = _both(case)
    labels = torch.tensor([[7, 9, 1], [12, 1, -100]])
    with torch.no_grad():
        assert close(ours(input_ids=IDS, attention_mask=MASK, labels=labels).loss,
                     theirs(input_ids=IDS, attention_mask=MASK, labels=labels).loss)
    base = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = ours(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        loss.backward()
        grads = {n for n, p in ours.named_parameters() if p.grad is not None}
        assert grads and all(n.startswith("base_model.method_state.default.") for n in grads)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(v, base[k]) for k, v in ours.get_base_model().state_dict().items())


@pytest.mark.parametrize("case", ["prompt-random", "prefix"])
def test_cache_argument_under_either_name(case):
    """A T5 whose forward takes its cache under the other name (`past_key_values`, transformers
    5.17; or `cache`, 5.24) gives the same logits and greedy generations (same operations: exact)."""
    from test_prompt import _cache_renamed

    ours, _ = _both(case)
    _perturbed(ours)
    logits, expected = _logits(ours), _generate(ours)
    _cache_renamed(ours.get_base_model())
    assert torch.equal(_logits(ours), logits)
    assert torch.equal(_generate(ours), expected)
    assert torch.equal(expected, _greedy_without_cache(ours))


def test_refusals():
    """The combinations PEFT's layout does not give a meaning: each a ValueError naming what to set."""
    with pytest.raises(ValueError, match="needs task_type SEQ_2_SEQ_LM"):
        get_peft_model(tiny_t5(), peftctl.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="needs task_type SEQ_2_SEQ_LM"):
        get_peft_model(tiny_t5(), peftctl.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="num_transformer_submodules 1"):
        get_peft_model(tiny_t5(), peftctl.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2,
                                                             num_transformer_submodules=1))
    with pytest.raises(ValueError, match="not SEQ_CLS"):
        get_peft_model(tiny_t5(), peftctl.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="pass input_ids, not encoder_outputs"):
        ours, _ = _both("prompt-random")
        ours(encoder_outputs=(torch.zeros(1, 3, 32),), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    ours, _ = _both("prompt-random")
    with pytest.raises(ValueError, match="cannot be merged"):
        ours.merge_and_unload()


@pytest.mark.parametrize("case", ["prompt-random", "ptuning-lstm"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(case):
    """Non-reentrant checkpointing (what `train.gradient_checkpointing` enables) on T5 with the virtual
    tokens in the encoder: its layers run again in the backward and the encoder's gradients are the
    same, to float32 rounding amplified by this model (see the module's tolerances: 2e-4 of the largest)."""
    from peftctl.loss import loss_sum
    from peftctl.train import enable_gradient_checkpointing

    name, kw = CASES[case]
    labels = torch.tensor([[7, 9, 1], [12, 1, -100]])
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = get_peft_model(tiny_t5(), getattr(peftctl, name)(task_type="SEQ_2_SEQ_LM", **kw))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        calls = [0]
        model.get_base_model().encoder.block[0].layer[0].SelfAttention.register_forward_hook(
            lambda *a, calls=calls: calls.__setitem__(0, calls[0] + 1))
        total, _ = loss_sum(model, {"input_ids": IDS, "attention_mask": MASK, "labels": labels, "task": "seq2seq_lm"})
        total.backward()
        runs.append((calls[0], {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (calls_a, a), (calls_b, b) = runs
    assert (calls_a, calls_b) == (1, 2)
    assert a.keys() == b.keys() and a and all(close(b[k], a[k]) for k in a)


def test_bf16_base_computes_in_bf16():
    """A bfloat16 T5: the prefix (or virtual tokens) cast down to it, the logits bfloat16, the
    encoder float32 with float32 gradients; generate() runs."""
    for case in ("prompt-random", "prefix"):
        name, kw = CASES[case]
        torch.manual_seed(1)
        model = get_peft_model(tiny_t5().to(torch.bfloat16), getattr(peftctl, name)(task_type="SEQ_2_SEQ_LM", **kw))
        labels = torch.tensor([[7, 9, 1], [12, 1, -100]])
        out = model.train()(input_ids=IDS, attention_mask=MASK, labels=labels)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
        assert _generate(model.eval(), steps=3).shape == (2, 4)
