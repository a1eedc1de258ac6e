"""AdaLoRA against Hugging Face PEFT (a test-only reference): a fixed training run whose masks and
weights are PEFT's, adapters moving both ways with the same outputs (full and pruned), merging,
several adapters, quantized bases, and the refusals where PEFT cannot do something either.

Tolerances. The fixed run: both sides run the same float32 operations in the same order on the
same CPU (the forward `(x @ (Q*Λ)ᵀ @ Pᵀ) * s / (ranknum + 1e-5)`, the same orthogonality sum, the
same element-wise averages and `kthvalue`), so weights and masks are compared exactly: any
difference is a different formula, and a single flipped triplet shows. Outputs of loaded adapters:
to float32 rounding of the base matmuls (sums of about 100 products of magnitude below 1, 2**-24
each): atol 1e-5. Merging: the tests use random (not zero) Λ, so updates of order 1-10 and outputs
up to about 100 on the small modules; the merged forward sums (W + ΔW) x where the unmerged one sums
W x and ΔW x apart, the same products in another grouping, each rounded by 2**-24 relative: a few
tens of ulps of the output at most, so rtol 1e-5 (a wrong merge is off by O(1)).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_modules import make, tiny_gpt2

import peftctl
from peftctl import AdaLoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the AdaLoRA reference; install the test extra")

ATOL = 1e-5
MERGE_RTOL = 1e-5


def theirs_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and custom models
        return peft.get_peft_model(base, peft.AdaLoraConfig(**kw))


def keys_and_shapes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


def tensors(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_params(model):
    """name -> tensor of the adapter's A, E, B (PEFT's and peftctl's names are the same)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(f".lora_{k}." in n for k in "AEB")}


def test_default_targets_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    from peftctl.adapters.adalora.config import DEFAULT_TARGETS

    assert DEFAULT_TARGETS == PEFT_TARGETS


# The fixed run: 4 adapted modules x init_r 4 = 16 triplets, pruned to target_r 2 x 4 = 8 by step 10
# (tinit 2, tfinal 3 of 13 steps), with gradient steps from AdamW.
RUN = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 13, "lora_alpha": 16,
       "beta1": 0.8, "beta2": 0.9, "orth_reg_weight": 0.3, "target_modules": ["q_proj", "v_proj"],
       "task_type": "CAUSAL_LM"}  # PEFT adds its orthogonality term only through a task type's model class


def _peft_run(base, batches):
    model = theirs_model(base, **RUN)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step, ids in enumerate(batches, start=1):
        model(input_ids=ids, labels=ids).loss.backward()  # PEFT adds the orthogonality term to .loss
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model


def _our_run(base, batches, stop_after=None, hooks_state=None, opt_state=None):
    model = get_peft_model(base, AdaLoraConfig(**RUN))
    hooks = model.base_model.training_hooks()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step, ids in enumerate(batches, start=1):
        loss = model(input_ids=ids, labels=ids).loss
        for term in hooks.loss_terms().values():
            loss = loss + term
        loss.backward()
        opt.step()
        hooks.after_optimizer_step(step)
        opt.zero_grad()
    return model, hooks


def test_a_fixed_run_prunes_to_peft_s_masks_and_weights(tiny_llama, tmp_path):
    """Same initial weights (same seed), same batches, same optimizer: after the schedule has pruned,
    the live weights, the masks and the saved adapter (cut to the surviving triplets) are PEFT's."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 300, (2, 10), generator=gen) for _ in range(RUN["total_step"])]
    torch.manual_seed(11)
    theirs = _peft_run(tiny_llama(), batches)
    torch.manual_seed(11)
    ours, hooks = _our_run(tiny_llama(), batches)

    mine, ref = adapter_params(ours), adapter_params(theirs)
    assert mine.keys() == ref.keys() and len(mine) == 12
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name  # same operations, same order: identical bits
    pattern = theirs.peft_config["default"].rank_pattern
    kept = {k.removesuffix(".default"): v for k, v in pattern.items()}
    assert sum(sum(v) for v in kept.values()) == 8 and any(sum(v) != 2 for v in kept.values())  # uneven ranks
    hooks.end()  # the run is over: cut the layers to the surviving triplets, record them
    assert ours.peft_config["default"].rank_pattern == kept
    assert ours.peft_config["default"].total_step == RUN["total_step"]

    ids = batches[0]
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    saved_ours, saved_theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert saved_ours.keys() == saved_theirs.keys()
    for k in saved_theirs:
        assert torch.equal(saved_ours[k], saved_theirs[k]), k
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "rank_pattern", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                  "orth_reg_weight", "total_step", "lora_alpha", "inference_mode"):
        assert cfgs[0][field] == cfgs[1][field], field

    # Each library loads the other's pruned file (layers of the surviving ranks, ranknum init_r).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    in_ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    expected = logits(theirs, ids)
    torch.testing.assert_close(logits(in_peft, ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(in_ours, ids), expected, rtol=0, atol=ATOL)
    with in_ours.disable_adapter():
        assert (logits(in_ours, ids) - expected).abs().max() > 1e-3  # the trained adapter matters
    q0 = in_ours.base_model.model.model.layers[0].self_attn.q_proj
    assert q0.r["default"] == sum(kept["model.layers.0.self_attn.q_proj.lora_E"])
    assert float(q0.ranknum["default"]) == RUN["init_r"]


# case -> (model kind, AdaLoraConfig keywords besides total_step)
CASES = {
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_r": 3, "lora_alpha": 4,
                        "modules_to_save": ["lm_head"]}),
    "llama-default-bias": ("llama", {"layers_to_transform": [1], "bias": "all"}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"]}),  # transformers' Conv1D
    "mlp": ("mlp", {"target_modules": ["lin0", "lin1"], "lora_alpha": 0}),  # alpha 0: scaling is r
    "conv2d": ("conv2d", {"target_modules": ["conv", "pw", "lin0"]}),
}


def _model(kind, tiny_llama):
    if kind == "llama":
        return tiny_llama()
    return tiny_gpt2() if kind == "gpt2" else make(kind)


def _inputs(kind):
    gen = torch.Generator().manual_seed(7)
    if kind in ("llama", "gpt2"):
        return {"input_ids": torch.randint(0, 300, (2, 12), generator=gen)}
    torch.manual_seed(7)
    return {"x": type(make(kind)).inputs()}


def _out(model, x):
    with torch.no_grad():
        return model(x["x"]) if "x" in x else model(**x).logits


@pytest.mark.parametrize("case", CASES)
def test_both_ways_with_peft_counts_and_merging(tiny_llama, tmp_path, case, capsys):
    kind, kw = CASES[case]
    x = _inputs(kind)
    torch.manual_seed(3)
    ours = get_peft_model(_model(kind, tiny_llama), AdaLoraConfig(init_lora_weights=False, total_step=10, **kw)).eval()
    torch.manual_seed(3)
    theirs = theirs_model(_model(kind, tiny_llama), init_lora_weights=False, total_step=10, **kw).eval()
    # Same seed, same creation order: PEFT's random weights (not a no-op adapter).
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), rtol=0, atol=ATOL)
    with ours.disable_adapter():
        assert (_out(ours, x) - _out(theirs, x)).abs().max() > 1e-2
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == printed[1] and printed[0].startswith("trainable params: ")

    with torch.no_grad():  # make the two differ, so that loading is what makes them agree
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(_model(kind, tiny_llama), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(in_peft, x), _out(ours, x), rtol=0, atol=ATOL)
    in_ours = PeftModel.from_pretrained(_model(kind, tiny_llama), tmp_path / "theirs")
    torch.testing.assert_close(_out(in_ours, x), _out(theirs, x), rtol=0, atol=ATOL)
    assert keys_and_shapes(tmp_path / "ours") == keys_and_shapes(tmp_path / "theirs")
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "fan_in_fan_out", "modules_to_save", "init_r", "lora_alpha", "bias", "total_step",
                  "inference_mode", "rank_pattern", "layers_to_transform"):
        assert cfgs[0][field] == cfgs[1][field], field

    # Merged equals unmerged, and PEFT's merge (relative: see the module docstring).
    unmerged = _out(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, x), unmerged, rtol=MERGE_RTOL, atol=ATOL)
    ours.unmerge_adapter()
    torch.testing.assert_close(_out(ours, x), unmerged, rtol=MERGE_RTOL, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, peft_merged = ours.merge_and_unload(), in_peft.merge_and_unload()
    torch.testing.assert_close(_out(merged, x), unmerged, rtol=MERGE_RTOL, atol=ATOL)
    ours_sd, theirs_sd = merged.state_dict(), peft_merged.state_dict()
    for k in theirs_sd:
        torch.testing.assert_close(ours_sd[k], theirs_sd[k], rtol=0, atol=ATOL, msg=k)


def test_several_adapters_as_peft(tiny_llama, tmp_path):
    """One trainable AdaLoRA adapter per model (PEFT's rule), others in inference mode: add / set /
    both active / disable / delete, against PEFT."""
    second = {"target_modules": ["q_proj", "down_proj"], "init_r": 2, "inference_mode": True}
    models = []
    for lib in (peftctl, peft):
        torch.manual_seed(5)
        m = lib.get_peft_model(tiny_llama(), lib.AdaLoraConfig(init_lora_weights=False, total_step=5,
                                                               target_modules=["q_proj", "v_proj"]))
        m.add_adapter("b", lib.AdaLoraConfig(init_lora_weights=False, total_step=5, **second))
        models.append(m.eval())
    ours, theirs = models
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for names in ("b", ["default", "b"]):
        ours.base_model.set_adapter(names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="AdaLoRA trains one adapter per model and 'default' is not in inference"):
        ours.add_adapter("c", AdaLoraConfig(total_step=5))
    assert "c" not in ours.peft_config
    ours.delete_adapter("default")
    assert list(ours.peft_config) == ["b"] and not ours.base_model.training_hooks()
    ours.save_pretrained(tmp_path)
    assert {k.split(".")[-2] for k in keys_and_shapes(tmp_path / "b")} == {"q_proj", "down_proj"}


def test_what_peft_cannot_do_either_is_refused_clearly(tiny_llama):
    model = get_peft_model(tiny_llama(), AdaLoraConfig(total_step=4)).eval()
    ids = torch.randint(0, 300, (2, 5))
    with pytest.raises(ValueError, match=r"adapter_names \(a mixed batch\) is not available for ADALORA adapters"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="add_weighted_adapter is not defined for ADALORA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "x")
    with pytest.raises(ValueError, match="PEFT options peftctl does not implement: use_dora=True"):
        AdaLoraConfig(use_dora=True, total_step=4)
    # LoRA's r means nothing to AdaLoRA (init_r is the rank): never dropped without a word
    with pytest.warns(UserWarning, match="AdaLoraConfig: r is not used by AdaLoRA and is ignored; the initial rank is init_r"):
        assert AdaLoraConfig(r=16, total_step=4).init_r == 12
    with pytest.raises(ValueError, match=r"tinit \(3\) must be below total_step - tfinal \(4 - 1\)"):
        AdaLoraConfig(tinit=3, tfinal=1, total_step=4)
    with pytest.raises(ValueError, match="beta1"):
        AdaLoraConfig(beta1=1.0)
    with pytest.raises(TypeError, match=r"module model.embed_tokens is a .*Embedding; AdaLoRA here supports"):
        get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=["embed_tokens"], total_step=4))
    with pytest.raises(TypeError, match="grouped Conv2d"):
        get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)),
                       AdaLoraConfig(target_modules=["0"], total_step=4))
    unset = get_peft_model(tiny_llama(), AdaLoraConfig())
    with pytest.raises(ValueError, match="total_step is unset"):
        unset.base_model.training_hooks().after_optimizer_step(1)
    with pytest.raises(ValueError, match="without total_step cannot be saved"):
        unset.save_pretrained("/nonexistent-never-written")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bases_move_both_ways_with_peft(tiny_model_dir, tmp_path, bits):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes provides the quantized layers")
    from test_quantized import loaded_by_transformers, quantized

    torch.manual_seed(0)
    ref = theirs_model(quantized(tiny_model_dir, bits), init_lora_weights=False, total_step=4,
                       target_modules=["q_proj", "down_proj"])
    ref.save_pretrained(tmp_path / "from_peft")
    ours = PeftModel.from_pretrained(loaded_by_transformers(tiny_model_dir, bits), tmp_path / "from_peft")
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantizedLinear"
    ours.save_pretrained(tmp_path / "from_peftctl")
    back = peft.PeftModel.from_pretrained(quantized(tiny_model_dir, bits), tmp_path / "from_peftctl")
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = logits(ref.eval(), ids)
    with ours.disable_adapter():
        assert (logits(ours.eval(), ids) - expected).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(back.eval(), ids), expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="merging an AdaLoRA adapter into a quantized Linear"):
        ours.merge_and_unload()
