"""VeRA against Hugging Face PEFT (a test-only reference): the same projections and vectors from the
same seed, adapters moving both ways with the same outputs (projections saved or drawn again from the
key), merging, several adapters, quantized bases; and the refusals where PEFT cannot do something either.

Tolerances: float32 throughout. Both libraries compute the same products in the same order
(b ⊙ (B (d ⊙ (A x))) beside the same base layers), so outputs agree to float32 rounding of the
matmuls' sums: a 2-layer model with inputs and logits of order 1 stays well below 1e-5 (sums of at
most ~128 products of magnitude below 1, 2**-24 relative error each). A merged weight W + (b B)(d A)
computes the same sum in another order: the same bound.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_modules import make, tiny_gpt2

import peftctl
from peftctl import PeftModel, VeraConfig, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the VeRA reference; install the test extra")

ATOL = 1e-5

# case -> (model kind, VeraConfig keywords)
CASES = {
    "llama-default": ("llama", {"r": 8}),  # PEFT's Llama default: q_proj, v_proj
    "llama-all-linear-key-only": ("llama", {"r": 16, "target_modules": "all-linear", "save_projection": False,
                                            "projection_prng_key": 7}),
    "llama-layers-dropout-save": ("llama", {"r": 8, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1],
                                            "vera_dropout": 0.1, "modules_to_save": ["lm_head"]}),
    "gpt2-default": ("gpt2", {"r": 8}),  # transformers' Conv1D (c_attn): fan_in_fan_out
    "linear-bias-vera-only": ("mlp", {"r": 4, "target_modules": ["lin0", "lin1"], "bias": "vera_only"}),
}


@pytest.fixture
def build(tiny_llama):
    def model(kind):
        if kind == "llama":
            return tiny_llama()
        return tiny_gpt2() if kind == "gpt2" else make(kind)

    return model


def inputs(kind):
    gen = torch.Generator().manual_seed(7)
    if kind in ("llama", "gpt2"):
        return {"input_ids": torch.randint(0, 300, (2, 12), generator=gen)}
    torch.manual_seed(7)
    return {"x": type(make(kind)).inputs()}


def out(model, x):
    with torch.no_grad():
        if "x" in x:
            return model(x["x"])
        return model(**x).logits


def theirs_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and save_projection
        return peft.get_peft_model(base, peft.VeraConfig(**kw))


def keys_and_shapes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


def test_default_targets_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    from peftctl.adapters.vera.config import DEFAULT_TARGETS

    assert DEFAULT_TARGETS == PEFT_TARGETS


@pytest.mark.parametrize("case", CASES)
def test_both_ways_with_peft(build, tmp_path, case, capsys):
    kind, kw = CASES[case]
    x = inputs(kind)
    torch.manual_seed(3)
    ours = get_peft_model(build(kind), VeraConfig(init_weights=False, **kw)).eval()
    torch.manual_seed(3)
    theirs = theirs_model(build(kind), init_weights=False, **kw).eval()
    # Same key, same seed, same creation order: PEFT's projections and vectors from the start.
    torch.testing.assert_close(ours.base_model.method_state["default"].vera_A, theirs.base_model.vera_A["default"],
                               rtol=0, atol=0)
    torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
    with ours.disable_adapter():
        assert (out(ours, x) - out(theirs, x)).abs().max() > 1e-2  # the adapter matters
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
        in_peft = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(out(in_peft, x), out(ours, x), rtol=0, atol=ATOL)
    in_ours = PeftModel.from_pretrained(build(kind), tmp_path / "theirs")
    torch.testing.assert_close(out(in_ours, x), out(theirs, x), rtol=0, atol=ATOL)
    saved = keys_and_shapes(tmp_path / "ours")
    assert saved == keys_and_shapes(tmp_path / "theirs")
    assert any(k.endswith(".vera_lambda_d") for k in saved)
    assert ("base_model.vera_A" in saved) == kw.get("save_projection", True)  # else drawn again from the key
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    assert set(cfgs[0]) == set(cfgs[1]) - {"auto_mapping", "peft_version"}  # PEFT's keys, no others
    for field in ("peft_type", "r", "fan_in_fan_out", "modules_to_save", "init_weights", "inference_mode",
                  "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "bias",
                  "layers_to_transform"):
        assert cfgs[0][field] == cfgs[1][field], field
    if kw.get("target_modules") != "all-linear":  # PEFT writes its sets in any order (all-linear: as paths)
        assert set(cfgs[0]["target_modules"]) == set(cfgs[1]["target_modules"])


@pytest.mark.parametrize("case", ["llama-layers-dropout-save", "gpt2-default", "linear-bias-vera-only"])
def test_merged_equals_unmerged_and_peft_s_merge(build, case):
    kind, kw = CASES[case]
    x = inputs(kind)
    torch.manual_seed(3)
    ours = get_peft_model(build(kind), VeraConfig(init_weights=False, **kw)).eval()
    torch.manual_seed(3)
    theirs = theirs_model(build(kind), init_weights=False, **kw).eval()
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "vera_" not in k}
    unmerged = out(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(out(ours, x), unmerged, rtol=0, atol=ATOL)
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if "vera_" not in k}
    for k, v in before.items():  # W + Δ - Δ: within a rounding of W's magnitude
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6, msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    torch.testing.assert_close(out(merged, x), unmerged, rtol=0, atol=ATOL)
    ours_sd, theirs_sd = merged.state_dict(), peft_merged.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for k in theirs_sd:
        torch.testing.assert_close(ours_sd[k], theirs_sd[k], rtol=0, atol=ATOL, msg=k)


def test_several_adapters_as_peft(tiny_llama, tmp_path):
    """add / set / both active / disable / delete against PEFT: a later adapter uses the first one's
    projections; its file loads alone here (PEFT refuses it); what PEFT refuses is refused."""
    first = {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    second = {"r": 8, "target_modules": ["q_proj"]}
    models = []
    for lib in (peftctl, peft):
        torch.manual_seed(5)
        m = lib.get_peft_model(tiny_llama(), lib.VeraConfig(init_weights=False, **first))
        m.add_adapter("second", lib.VeraConfig(init_weights=False, **second))
        models.append(m.eval())
    ours, theirs = models
    x = inputs("llama")
    torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
    for names in ("second", ["default", "second"]):
        ours.set_adapter(names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
        plain = out(ours, x)
    assert (out(ours, x) - plain).abs().max() > 1e-2

    ours.set_adapter("second")
    theirs.base_model.set_adapter("second")
    expected = out(theirs, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    # "second" was saved with the first adapter's projections (8 x 128), larger than its q_proj needs:
    # PEFT cannot load that file on its own; peftctl can.
    assert keys_and_shapes(tmp_path / "theirs" / "second")["base_model.vera_A"] == (8, 128)
    with pytest.raises(RuntimeError, match="size mismatch for base_model.vera_A"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs" / "second")
    alone = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs" / "second").eval()
    torch.testing.assert_close(out(alone, x), expected, rtol=0, atol=ATOL)

    ours.delete_adapter("default")  # "second" keeps its own copy of the projections
    assert list(ours.peft_config) == ["second"] and list(ours.base_model.method_state) == ["second"]
    torch.testing.assert_close(out(ours, x), expected, rtol=0, atol=ATOL)
    for kw, says in (
        ({"r": 4}, "a later adapter needs the same r"),  # PEFT fails in the forward
        ({"r": 8, "target_modules": ["down_proj", "up_proj"]}, r"layers up to 128 inputs and 128 outputs"),
        ({"r": 8, "projection_prng_key": 1}, "need the same projection_prng_key: 'c' has 1, 'second' has 0"),
        ({"r": 8, "save_projection": False}, "save their projections all or none"),
    ):
        with pytest.raises(ValueError, match=says):
            ours.add_adapter("c", VeraConfig(**{"target_modules": ["q_proj"], **kw}))
        assert list(ours.peft_config) == ["second"] and "c" not in ours.base_model.method_state


def test_projections_drawn_again_from_the_key_when_not_saved(tiny_llama, tmp_path):
    """save_projection false: the file holds the vectors only and loading draws A and B again from
    projection_prng_key, which gives the same matrices (the CPU generator is deterministic)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), VeraConfig(r=8, save_projection=False, projection_prng_key=11,
                                                    init_weights=False)).eval()
    model.save_pretrained(tmp_path)
    assert not any("vera_A" in k or "vera_B" in k for k in keys_and_shapes(tmp_path))
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    for key in ("vera_A", "vera_B"):
        torch.testing.assert_close(getattr(back.base_model.method_state["default"], key),
                                   getattr(model.base_model.method_state["default"], key), rtol=0, atol=0)
    x = inputs("llama")
    torch.testing.assert_close(out(back, x), out(model, x), rtol=0, atol=0)
    # A later adapter uses the first one's projections, which its own key would not redraw on load.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add_adapter("third", VeraConfig(r=8, save_projection=False, projection_prng_key=11,
                                              target_modules=["q_proj"]))  # the same sizes: the same draw
    with pytest.warns(UserWarning, match="with save_projection=false its file reloads exactly only after an adapter"):
        model.add_adapter("second", VeraConfig(r=8, save_projection=False, projection_prng_key=11,
                                               target_modules=["v_proj"]))  # 32 outputs, not 64


def test_exclude_modules_is_recorded_so_peft_selects_the_same_modules(tiny_llama, tmp_path):
    """PEFT's VeraConfig has no exclude_modules: the file names the adapted modules exactly instead."""
    torch.manual_seed(0)
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"],
                        layers_to_transform=[0, 1], init_weights=False)
    model = get_peft_model(tiny_llama(), config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "exclude_modules" not in saved and saved["layers_to_transform"] is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not [w for w in caught if "Unexpected keyword arguments" in str(w.message)]  # only PEFT's keys
    adapted = sorted(n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.vera.VeraLayer))
    assert [n.removeprefix("base_model.model.model.") for n in adapted] == [
        "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    x = inputs("llama")
    torch.testing.assert_close(out(theirs, x), out(model, x), rtol=0, atol=ATOL)


def test_what_peft_cannot_do_either_is_refused_clearly(tiny_llama):
    model = get_peft_model(tiny_llama(), VeraConfig(r=4)).eval()
    ids = torch.randint(0, 300, (2, 5))
    with pytest.raises(ValueError, match=r"adapter_names \(a mixed batch\) is not available for VERA adapters"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="add_weighted_adapter is not defined for VERA adapters"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    with pytest.raises(ValueError, match="resize_adapter_rank is defined for LoRA adapters only; this model holds VERA"):
        model.resize_adapter_rank("default", 2)
    with pytest.raises(TypeError, match=r"module conv is a torch.nn.modules.conv.Conv2d; VeRA here supports: "):
        get_peft_model(make("conv2d"), VeraConfig(target_modules=["conv", "lin0"]))
    with pytest.raises(ValueError, match="No layers types compatible with VeRA were found"):
        get_peft_model(make("conv2d"), VeraConfig(target_modules=["conv"]))
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_alpha'"):
        VeraConfig(lora_alpha=8)
    with pytest.raises(ValueError, match="this model holds vera adapters; a lora adapter cannot be added"):
        model.add_adapter("l", peftctl.LoraConfig(target_modules=["q_proj"]))


def test_trains_from_the_python_api_and_peft_loads_the_result(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama(), VeraConfig(r=32, target_modules="all-linear"))
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "vera_lambda" not in k}
    projections = {k: v.clone() for k, v in model.base_model.method_state.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".vera_lambda_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02
    for k, v in model.get_base_model().state_dict().items():
        if "vera_lambda" not in k:
            assert torch.equal(v, base[k]), k  # only the vectors moved
    for k, v in model.base_model.method_state.state_dict().items():
        assert torch.equal(v, projections[k]), k  # the projections are frozen
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(out(theirs.eval(), {"input_ids": ids}), out(model.eval(), {"input_ids": ids}),
                               rtol=0, atol=ATOL)


# ---- quantized bases (bitsandbytes 4-bit and 8-bit, on CPU) --------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bases_move_both_ways_with_peft(tiny_model_dir, tmp_path, bits):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes provides the quantized layers")
    from test_quantized import loaded_by_transformers, quantized

    torch.manual_seed(0)
    ref = theirs_model(quantized(tiny_model_dir, bits), r=8, init_weights=False, target_modules="all-linear")
    ref.save_pretrained(tmp_path / "from_peft")
    ours = PeftModel.from_pretrained(loaded_by_transformers(tiny_model_dir, bits), tmp_path / "from_peft")
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantizedLinear"
    ours.save_pretrained(tmp_path / "from_peftctl")
    back = peft.PeftModel.from_pretrained(quantized(tiny_model_dir, bits), tmp_path / "from_peftctl")
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids).logits
        with ours.disable_adapter():
            assert (ours.eval()(input_ids=ids).logits - expected).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.vera_delta("default", x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot merge into a quantized Linear(4bit|8bitLt) weight"):
        ours.merge_and_unload()
