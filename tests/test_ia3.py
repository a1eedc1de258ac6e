"""(IA)³ against Hugging Face PEFT (a test-only reference): the same vectors from the same seed,
adapters moving both ways with the same outputs, merging, several adapters, combination, quantized
bases; and the refusals where PEFT cannot do something either.

Tolerances: float32 throughout. Both libraries compute the same products (an element-wise scaling
around the same base layers), so outputs agree to float32 rounding of the base matmuls' sums: a
2-layer model with inputs and logits of order 1 stays well below 1e-5 (about 100 products of
magnitude below 1 per sum, 2**-24 each). Merging multiplies a weight by l once (relative error
2**-24); unmerging divides again, so a merge-unmerge round trip is within 2 ulps (rtol 1e-6).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_modules import make, tiny_gpt2
from torch import nn

import peftctl
from peftctl import IA3Config, PeftModel, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the (IA)³ reference; install the test extra")

ATOL = 1e-5


class Grouped(nn.Module):
    """A grouped convolution: input scaling merges into its weight per group (PEFT's layout)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.lin0 = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        return self.lin0(self.conv(x).flatten(1))

    @staticmethod
    def inputs(n=4):
        return torch.randn(n, 4, 5, 5)


def _grouped(seed=0):
    torch.manual_seed(seed)
    m = Grouped()
    with torch.no_grad():
        m.conv.bias.normal_(0, 0.1)
    return m


# case -> (model kind, IA3Config keywords). Models without a transformers config name their
# feed-forward modules (PEFT's default table is by model type).
CASES = {
    "llama-default": ("llama", {}),
    "llama-all-linear-ff-regex": ("llama", {"target_modules": "all-linear",
                                            "feedforward_modules": r".*mlp\.(gate|up)_proj"}),
    "llama-exclude-save": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules":
                                     ["down_proj"], "exclude_modules": ["layers.0.self_attn.v_proj"],
                                     "modules_to_save": ["lm_head"]}),
    # PEFT writes these two files with feedforward_modules not a subset of target_modules and then
    # cannot load them itself; peftctl loads them, and writes its own so that PEFT can.
    "llama-all-linear-ff-list": ("llama", {"target_modules": "all-linear", "feedforward_modules": ["down_proj",
                                                                                                  "up_proj"]}),
    "llama-targets-default-ff": ("llama", {"target_modules": ["k_proj", "mlp.down_proj"]}),
    "gpt2-default": ("gpt2", {}),  # transformers' Conv1D; mlp.c_proj scales its input
    "linear-bias": ("mlp", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0"]}),
    # fan_in_fan_out follows the layer (PEFT sets it false for nn.Linear, with a warning): no effect here.
    "linear-fan-in-fan-out": ("mlp", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"],
                                      "fan_in_fan_out": True}),
    "conv2d": ("conv2d", {"target_modules": ["conv", "pw"], "feedforward_modules": ["pw"]}),
    "conv2d-groups-input": ("grouped", {"target_modules": ["conv"], "feedforward_modules": ["conv"]}),
    "conv2d-groups-output": ("grouped", {"target_modules": ["conv"], "feedforward_modules": []}),
    "conv3d": ("conv3d", {"target_modules": ["conv"], "feedforward_modules": []}),
}


@pytest.fixture
def build(tiny_llama):
    def model(kind):
        if kind == "llama":
            return tiny_llama()
        if kind == "gpt2":
            return tiny_gpt2()
        return _grouped() if kind == "grouped" else make(kind)

    return model


def inputs(kind):
    gen = torch.Generator().manual_seed(7)
    if kind in ("llama", "gpt2"):
        return {"input_ids": torch.randint(0, 300, (2, 12), generator=gen)}
    torch.manual_seed(7)
    return {"x": (Grouped if kind == "grouped" else type(make(kind))).inputs()}


def out(model, x):
    with torch.no_grad():
        if "x" in x:
            return model(x["x"])
        return model(**x).logits


def theirs_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and custom models
        return peft.get_peft_model(base, peft.IA3Config(**kw))


def keys_and_shapes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


def test_default_targets_and_feedforward_modules_are_peft_s():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    from peftctl.adapters.ia3.config import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS

    assert DEFAULT_TARGETS == PEFT_TARGETS
    assert DEFAULT_FEEDFORWARD == PEFT_FF


@pytest.mark.parametrize("case", CASES)
def test_both_ways_with_peft(build, tmp_path, case, capsys):
    kind, kw = CASES[case]
    x = inputs(kind)
    torch.manual_seed(3)
    ours = get_peft_model(build(kind), IA3Config(init_ia3_weights=False, **kw))
    torch.manual_seed(3)
    theirs = theirs_model(build(kind), init_ia3_weights=False, **kw)
    ours.eval()
    theirs.eval()
    # Same seed, same creation order: PEFT's vectors from the start (random: not a no-op).
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
    assert keys_and_shapes(tmp_path / "ours") == keys_and_shapes(tmp_path / "theirs")
    assert any(k.endswith(".ia3_l") for k in keys_and_shapes(tmp_path / "ours"))
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "fan_in_fan_out", "modules_to_save", "init_ia3_weights", "inference_mode",
                  "exclude_modules"):
        assert cfgs[0][field] == cfgs[1][field], field
    if kw.get("target_modules") != "all-linear":  # PEFT writes its sets in any order (all-linear: as paths)
        assert set(cfgs[0]["target_modules"]) == set(cfgs[1]["target_modules"])
    # Both files scale the same side of every module (peftctl may write feedforward_modules otherwise).
    adapted = [k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in keys_and_shapes(tmp_path / "ours")]
    sides = [[IA3Config.from_peft_dict(c).is_feedforward(m) for m in adapted] for c in cfgs]
    assert sides[0] == sides[1] and any(sides[0]) == (kind != "conv3d" and "groups-output" not in case)


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_peft_s_merge(build, case):
    kind, kw = CASES[case]
    x = inputs(kind)
    torch.manual_seed(3)
    ours = get_peft_model(build(kind), IA3Config(init_ia3_weights=False, **kw)).eval()
    torch.manual_seed(3)
    theirs = theirs_model(build(kind), init_ia3_weights=False, **kw).eval()
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "ia3_l" not in k}
    unmerged = out(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(out(ours, x), unmerged, rtol=0, atol=ATOL)
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if "ia3_l" not in k}
    for k, v in before.items():  # divided back exactly, up to float32 rounding
        torch.testing.assert_close(after[k], v, rtol=1e-6, atol=0, msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    torch.testing.assert_close(out(merged, x), unmerged, rtol=0, atol=ATOL)
    ours_sd, theirs_sd = merged.state_dict(), peft_merged.state_dict()
    if kw.get("modules_to_save"):  # peftctl's unload keeps the trained copy; PEFT's too: the same here
        assert ours_sd.keys() == theirs_sd.keys()
    for k in theirs_sd:
        torch.testing.assert_close(ours_sd[k], theirs_sd[k], rtol=0, atol=ATOL, msg=k)


def test_several_adapters_as_peft(tiny_llama, tmp_path):
    """add / set (one, then both) / disable / delete, and merging two at once, against PEFT."""
    second = {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    models = []
    for lib in (peftctl, peft):
        torch.manual_seed(5)
        m = lib.get_peft_model(tiny_llama(), lib.IA3Config(init_ia3_weights=False))
        m.add_adapter("b", lib.IA3Config(init_ia3_weights=False, **second))
        models.append(m.eval())
    ours, theirs = models
    x = inputs("llama")
    torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
    for names in ("b", ["default", "b"]):
        ours.set_adapter(names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
        plain = out(ours, x)
    assert (out(ours, x) - plain).abs().max() > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_ours = ours.merge_and_unload(adapter_names=["default", "b"]).state_dict()
        m_theirs = theirs.merge_and_unload(adapter_names=["default", "b"]).state_dict()
    for k in m_theirs:
        torch.testing.assert_close(m_ours[k], m_theirs[k], rtol=0, atol=ATOL, msg=k)

    torch.manual_seed(5)
    ours = get_peft_model(tiny_llama(), IA3Config(init_ia3_weights=False))
    ours.add_adapter("b", IA3Config(init_ia3_weights=False, **second))
    ours.delete_adapter("default")
    assert list(ours.peft_config) == ["b"] and ours.active_adapters == ["b"]
    ours.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()  # only "b", in its subfolder (PEFT's layout)
    saved = keys_and_shapes(tmp_path / "b")
    assert {k.split(".")[-2] for k in saved} == {"q_proj", "down_proj"}
    with pytest.raises(ValueError, match="scales some features by exactly 0"):
        with torch.no_grad():
            ours.base_model.model.model.layers[0].mlp.down_proj.ia3_l["b"][0, 0] = 0.0
        ours.merge_adapter()
        ours.unmerge_adapter()


def test_add_weighted_adapter_is_peft_s_weighted_sum(tiny_llama):
    second = {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    models = []
    for lib in (peftctl, peft):
        torch.manual_seed(5)
        m = lib.get_peft_model(tiny_llama(), lib.IA3Config(init_ia3_weights=False))
        m.add_adapter("b", lib.IA3Config(init_ia3_weights=False, **second))
        m.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix")
        m.set_adapter("mix")
        models.append(m.eval())
    ours, theirs = models
    x = inputs("llama")
    torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    down = ours.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(down.ia3_l["mix"], 0.6 * down.ia3_l["default"] + 0.4 * down.ia3_l["b"])
    with pytest.raises(ValueError, match="weighted sum of their vectors .* not 'svd'"):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="svd")
    with pytest.raises(ValueError, match="takes no density"):
        ours.add_weighted_adapter(["default", "b"], [1, 1], "x", density=0.5)


def test_what_peft_cannot_do_either_is_refused_clearly(tiny_llama):
    model = get_peft_model(tiny_llama(), IA3Config()).eval()
    ids = torch.randint(0, 300, (2, 5))
    with pytest.raises(ValueError, match=r"adapter_names \(a mixed batch\) is not available for IA3 adapters"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="resize_adapter_rank is defined for LoRA adapters only; this model holds IA3"):
        model.resize_adapter_rank("default", 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'layers_to_transform'"):
        IA3Config(layers_to_transform=[0])  # PEFT's IA3Config has no layer selection either
    with pytest.raises(ValueError, match="feedforward_modules must be a subset of target_modules; not among them: "
                                         "down_proj"):
        IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="feedforward_modules is unset and there is no default for model type None"):
        get_peft_model(make("mlp"), IA3Config(target_modules=["lin0"]))
    with pytest.raises(TypeError, match=r"module conv is a torch.nn.modules.conv.Conv1d; IA3 here supports: .*Conv2d"):
        get_peft_model(make("conv1d"), IA3Config(target_modules=["conv"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="this model holds ia3 adapters; a lora adapter cannot be added"):
        model.add_adapter("l", peftctl.LoraConfig(target_modules=["q_proj"]))


def test_trains_from_the_python_api_and_peft_loads_the_result(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama(), IA3Config())
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "ia3_l" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ia3_l." in n for n in trainable)
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
    assert losses[-1] < losses[0] - 0.02  # 384 scaling factors on a random model: a small but real gain
    for k, v in model.get_base_model().state_dict().items():
        if "ia3_l" not in k:
            assert torch.equal(v, base[k]), k  # only the vectors moved
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(out(theirs.eval(), {"input_ids": ids}), out(model.eval(), {"input_ids": ids}),
                               rtol=0, atol=ATOL)


# ---- quantized bases (bitsandbytes 4-bit and 8-bit, on CPU) --------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bases_follow_the_formula_and_move_both_ways_with_peft(tiny_model_dir, tmp_path, bits):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes provides the quantized layers")
    from test_quantized import loaded_by_transformers, quantized

    from peftctl.bnb import dequantize

    # PEFT's model comes from peftctl's loader (kept on bitsandbytes' plain CPU path, see
    # test_quantized); ours is loaded as a user's own code would and must keep itself plain.
    torch.manual_seed(0)
    ref = theirs_model(quantized(tiny_model_dir, bits), init_ia3_weights=False, target_modules="all-linear",
                       feedforward_modules=["down_proj", "up_proj"])
    ref.save_pretrained(tmp_path / "from_peft")
    ours = PeftModel.from_pretrained(loaded_by_transformers(tiny_model_dir, bits), tmp_path / "from_peft")
    layer = ours.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantizedLinear" and layer.is_feedforward["default"]
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
        vec = layer.ia3_l["default"].flatten()
        torch.testing.assert_close(layer(x), layer.base_layer(x * vec), rtol=0, atol=0)
        if bits == 4:  # the plain path: the dequantized weight times the scaled input, in float32
            torch.testing.assert_close(layer(x), (x * vec) @ dequantize(layer.base_layer).T,
                                       rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="cannot merge into a quantized Linear(4bit|8bitLt) weight"):
        ours.merge_and_unload()
