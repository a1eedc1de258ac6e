"""Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT (a test-only reference): the
same weights from the same seed, the same logits, adapters moving both ways, generation with a KV
cache equal to generation without one, left-padded batches equal to their rows alone, and the
refusals (merging, mixed batches).

Tolerances: float32 throughout. Where both libraries run the same operations in the same order
(same encoder, same concatenation, same base model) the logits are bit-identical (atol 0 would
hold; 1e-6 leaves room for a different matmul blocking). A left-padded row against the same row
alone: the same products, but the attention's softmax and matmuls run over a longer (masked) row,
so sums are blocked differently: float32 rounding of sums of ~20 terms of order 1, far below 1e-4;
greedy tokens are compared exactly (a tie within 1e-4 between two top logits would be needed to
flip one, and the test inputs are fixed).

PEFT 0.21.2's own `generate()` for these methods is not the oracle: with transformers 5.24 its
greedy generations differ from greedy decoding by its own forward, for all three methods (seen on
this tiny Llama; its prepare_inputs_for_generation looks for `past_key_values` and `cache_position`,
which transformers 5.24's loop no longer passes). The oracle for generation is greedy decoding by repeated full forwards
(no cache), through PEFT's forward or peftctl's.
"""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_modules import tiny_gpt2

import peftctl
from peftctl import PeftModel, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the prompt-learning reference; install the test extra")

ATOL = 1e-6
IDS = torch.tensor([[5, 17, 30, 41, 7, 60], [9, 8, 5, 17, 30, 12]])

# case -> (peftctl config class name, keywords); the same keywords build PEFT's config.
CASES = {
    "prompt-random": ("PromptTuningConfig", {"num_virtual_tokens": 4}),
    "prompt-vocab": ("PromptTuningConfig", {"num_virtual_tokens": 5, "prompt_tuning_init": "SAMPLE_VOCAB"}),
    "ptuning-mlp": ("PromptEncoderConfig", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    "ptuning-lstm": ("PromptEncoderConfig", {"num_virtual_tokens": 3, "encoder_hidden_size": 8,
                                             "encoder_reparameterization_type": "LSTM", "encoder_num_layers": 2}),
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": 4}),
    "prefix-projection": ("PrefixTuningConfig", {"num_virtual_tokens": 3, "prefix_projection": True,
                                                 "encoder_hidden_size": 24}),
}


def _pair(name):
    return getattr(peftctl, name), getattr(peft, name)


def _base(kind, tiny_llama):
    return tiny_llama().eval() if kind == "llama" else tiny_gpt2()


def _both(kind, case, tiny_llama, seed=1):
    """The same config in both libraries, each on a fresh copy of the same base, from one seed."""
    name, kw = CASES[case]
    ours_cls, theirs_cls = _pair(name)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(_base(kind, tiny_llama), theirs_cls(task_type="CAUSAL_LM", **kw))
    torch.manual_seed(seed)
    ours = get_peft_model(_base(kind, tiny_llama), ours_cls(task_type="CAUSAL_LM", **kw))
    return ours.eval(), theirs.eval()


def _greedy_without_cache(model, ids, steps):
    """The oracle: each new token from a full forward over everything so far (no cache)."""
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=out).logits
        out = torch.cat((out, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


def _generate(model, ids, steps, mask=None):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)


# Every case on Llama; GPT-2 (learned absolute positions, its own cache use) for the prefix and one prompt case.
CASE_KINDS = [("llama", c) for c in CASES] + [("gpt2", c) for c in ("prompt-random", "prefix", "prefix-projection")]
MOVE_KINDS = [("llama", c) for c in CASES if c != "prompt-vocab"] + [("gpt2", "prefix")]


@pytest.mark.parametrize(("kind", "case"), CASE_KINDS, ids=[f"{k}-{c}" for k, c in CASE_KINDS])
def test_same_seed_same_weights_logits_and_counts(kind, case, tiny_llama):
    ours, theirs = _both(kind, case, tiny_llama)
    with torch.no_grad():
        a, b = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
        base = ours.get_base_model()(input_ids=IDS).logits
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL)
    assert (a[:, -IDS.shape[1]:] - base).abs().max() > 1e-3  # the adapter changes the output
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with ours.disable_adapter():
        with torch.no_grad():
            assert torch.equal(ours(input_ids=IDS).logits, base)


def _perturbed(model):
    """Trained-looking weights: every trainable tensor moved away from its init."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.mark.parametrize(("kind", "case"), MOVE_KINDS, ids=[f"{k}-{c}" for k, c in MOVE_KINDS])
def test_adapters_move_both_ways_with_identical_logits_and_generations(kind, case, tiny_llama, tmp_path):
    ours, theirs = _both(kind, case, tiny_llama)
    _perturbed(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(_base(kind, tiny_llama), tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        assert torch.allclose(loaded(input_ids=IDS).logits, expected, atol=ATOL)
    oracle = _greedy_without_cache(theirs, IDS, 6)
    assert torch.equal(_generate(loaded, IDS, 6), oracle)

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
    back = peft.PeftModel.from_pretrained(_base(kind, tiny_llama), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(back(input_ids=IDS).logits, ours(input_ids=IDS).logits, atol=ATOL)
    assert torch.equal(_greedy_without_cache(back, IDS, 6), _generate(ours, IDS, 6))


@pytest.mark.parametrize("case", ["prompt-random", "ptuning-mlp", "prefix"])
def test_generation_with_cache_and_left_padding(case, tiny_llama):
    ours, _ = _both("llama", case, tiny_llama)
    _perturbed(ours)
    expected = _greedy_without_cache(ours, IDS, 8)
    assert torch.equal(_generate(ours, IDS, 8), expected)
    # A batch of prompts of different lengths, left-padded: each row as it is alone.
    short = IDS[0, 2:]
    padded = torch.stack((torch.cat((torch.zeros(2, dtype=torch.long), short)), IDS[1]))
    mask = torch.stack((torch.tensor([0, 0, 1, 1, 1, 1]), torch.ones(6, dtype=torch.long)))
    batch = _generate(ours, padded, 8, mask)
    assert torch.equal(batch[0, 2:], _generate(ours, short[None], 8)[0])
    assert torch.equal(batch[1], expected[1])
    with torch.no_grad():  # the forward too: a padded row's logits are its logits alone
        n = ours.prepended_tokens()
        logits = ours(input_ids=padded, attention_mask=mask).logits
        alone = ours(input_ids=short[None]).logits
    assert torch.allclose(logits[0, n + 2:], alone[0, n:], atol=1e-4)


def _cache_renamed(model):
    """`model` as the other transformers line builds it: its forward and prepare_inputs_for_generation
    take the KV cache under the other name (`past_key_values` in transformers 5.17, `cache` in 5.24),
    and refuse the installed one (which would otherwise land unseen in **kwargs)."""
    from peftctl.adapters.prompt import cache_key

    cls, new = type(model), cache_key(model)
    old = "past_key_values" if new == "cache" else "cache"

    def forward(self, *args, **kwargs):
        if new in kwargs:
            raise TypeError(f"this model's forward takes its cache as {old}, not {new}")
        if old in kwargs:
            kwargs[new] = kwargs.pop(old)
        return cls.forward(self, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = cls.prepare_inputs_for_generation(self, *args, **kwargs)
        if new in inputs:
            inputs[old] = inputs.pop(new)
        return inputs

    signature = inspect.signature(cls.forward)
    forward.__signature__ = signature.replace(parameters=[
        p.replace(name=old) if p.name == new else p for p in signature.parameters.values()])
    model.__class__ = type(f"Renamed{cls.__name__}", (cls,), {
        "forward": forward, "prepare_inputs_for_generation": prepare_inputs_for_generation})
    return model


@pytest.mark.parametrize("case", ["prompt-random", "prefix"])
def test_cache_argument_under_either_name(case, tiny_llama):
    """transformers renamed the forward's KV cache argument (after 5.17, by 5.24) `past_key_values` to `cache`; a prefix
    passed under the name the model does not take was silently dropped (prefix tuning's mask then
    overran the keys), and generation never left its first step (prompt tuning's exact match 0%).
    peftctl reads the name from the model: a model taking the other name gives the same logits and
    the same greedy generations (same operations in the same order: exact)."""
    ours, _ = _both("llama", case, tiny_llama)
    _perturbed(ours)
    with torch.no_grad():
        logits = ours(input_ids=IDS).logits
    expected = _generate(ours, IDS, 6)
    _cache_renamed(ours.get_base_model())
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, logits)
    assert torch.equal(_generate(ours, IDS, 6), expected)
    assert torch.equal(expected, _greedy_without_cache(ours, IDS, 6))


def test_loss_counts_real_tokens_only(tiny_llama):
    """peftctl's training loss (`loss.loss_sum`, the head bypassed) equals cross-entropy over the
    real tokens' logits from the adapter's forward, with labels extended by IGNORE_INDEX as PEFT
    extends them (transformers' own loss with those labels gives the same mean)."""
    from peftctl.loss import loss_sum

    ours, theirs = _both("llama", "prompt-random", tiny_llama)
    labels = IDS.clone()
    labels[:, :2] = -100
    total, n = loss_sum(ours, {"input_ids": IDS, "labels": labels})
    logits = ours(input_ids=IDS).logits[:, 4:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(total, expected, rtol=1e-5)
    # PEFT's forward with labels (extended inside by -100) gives the same mean loss.
    assert torch.allclose(theirs(input_ids=IDS, labels=labels).loss, total / n, rtol=1e-5)
    # And gradients reach the virtual tokens only.
    total.backward()
    grads = [n for n, p in ours.named_parameters() if p.grad is not None]
    assert grads == ["base_model.method_state.default.embedding.weight"]


def test_text_init_and_merge_refused(tiny_llama, tiny_model_dir):
    torch.manual_seed(0)
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
               prompt_tuning_init_text="Convert the date", tokenizer_name_or_path=str(tiny_model_dir))
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**cfg))
    ours = get_peft_model(tiny_llama(), peftctl.PromptTuningConfig(**cfg))
    assert torch.equal(ours.base_model.method_state["default"].embedding.weight,
                       theirs.prompt_encoder["default"].embedding.weight)
    with pytest.raises(ValueError, match="cannot be merged: they add virtual tokens"):
        ours.merge_and_unload()
    with pytest.raises(ValueError, match="mixed batch"):
        ours(input_ids=IDS, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        peftctl.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="adapt no module"):
        peftctl.PromptTuningConfig(num_virtual_tokens=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="need a transformers model"):  # a plain module has no dimensions to read
        get_peft_model(torch.nn.Sequential(torch.nn.Embedding(10, 4)), peftctl.PromptTuningConfig(num_virtual_tokens=2))


def test_ptuning_file_trainable_waits_for_its_encoder(tiny_llama, tmp_path):
    """A P-tuning file holds the encoder's output; loaded trainable, the adapter refuses to run
    until the encoder's own state arrives (a checkpoint's training hooks), which must give that output."""
    ours, _ = _both("llama", "ptuning-mlp", tiny_llama)
    _perturbed(ours).save_pretrained(tmp_path / "a")
    state = ours.base_model.training_hooks().hooks["default"].state_dict()
    loaded = PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / "a", is_trainable=True)
    with pytest.raises(ValueError, match="holds only its encoder's output"):
        loaded(input_ids=IDS)
    loaded.base_model.training_hooks().hooks["default"].load_state_dict(state)
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits, atol=ATOL)


@pytest.mark.parametrize("case", ["prompt-random", "ptuning-lstm"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(case, tiny_llama):
    """Non-reentrant checkpointing with the virtual tokens in front: the layers run again in the
    backward and the gradients are the same (same operations; float32 rounding only, rtol 1e-5)."""
    from tiny import checkpointing_runs

    name, kw = CASES[case]
    labels = IDS.clone()
    labels[:, :2] = -100
    calls, grads = checkpointing_runs(
        lambda: get_peft_model(tiny_llama(), getattr(peftctl, name)(**kw)), {"input_ids": IDS, "labels": labels})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7) for k in grads[0])


@pytest.mark.parametrize("case", ["prompt-random", "prefix"])
def test_bf16_base_computes_in_bf16_and_trains_the_float32_encoder(case, tiny_llama):
    """A bfloat16 base: the virtual tokens (or keys and values) are cast down to it, nothing is upcast
    (the logits stay bfloat16), the encoder stays float32 and gets float32 gradients; the outputs are
    those of the float32 adapter up to bfloat16 rounding (8 bits of mantissa, through 2 layers:
    |logit| of order 1 within 0.1)."""
    from peftctl.loss import loss_sum

    name, kw = CASES[case]
    torch.manual_seed(0)
    ours = get_peft_model(tiny_llama().to(torch.bfloat16), getattr(peftctl, name)(**kw))
    torch.manual_seed(0)
    full = get_peft_model(tiny_llama(), getattr(peftctl, name)(**kw)).eval()
    with torch.no_grad():
        logits = ours.eval()(input_ids=IDS).logits
        assert logits.dtype == torch.bfloat16
        assert (logits.float() - full(input_ids=IDS).logits).abs().max() < 0.1
        assert _generate(ours, IDS, 3).shape == (2, IDS.shape[1] + 3)
    ours.train()
    total, _ = loss_sum(ours, {"input_ids": IDS, "labels": IDS})
    total.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", ["prefix"])
def test_fused_forwards_give_the_same_loss_and_gradients(case, tiny_model_dir):
    """`train.kernels` (the fused Llama forwards) with virtual tokens in front, or a prefix in the cache
    (the fused attention then runs the module's own forward): the same loss and encoder gradients as
    the module graph, in float64, up to the fused norm's float32 statistic per row (its rounding,
    2**-24 relative, reaches the gradients: observed 2**-27 absolute on gradients of order 1; bounded
    here at 1e-6 of the largest gradient)."""
    from transformers import AutoModelForCausalLM

    from peftctl.adapters.lora.fused import enable_fused
    from peftctl.loss import loss_sum

    name, kw = CASES[case]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                               getattr(peftctl, name)(**kw)).train()
        if fused:
            assert enable_fused(model)["attention"] == 2
        loss, _ = loss_sum(model, {"input_ids": IDS, "labels": IDS})
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-6)
    assert all(torch.allclose(x, y, rtol=0, atol=1e-6 * float(x.abs().max())) for x, y in zip(ga, gb, strict=True))
