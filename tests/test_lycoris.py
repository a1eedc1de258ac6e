"""LoHa and LoKr against Hugging Face PEFT (a test-only reference): the same factors from the same
seed, adapters moving both ways with the same outputs (eval and, with the dropouts, training mode),
the same gradients, merging, several adapters, quantized bases; and the refusals.

Tolerances: float32 throughout. Both libraries build the same ΔW from the same factors (a few
products and sums of at most r·r·kernel terms) and add the same base-layer-shaped product, so
outputs of a 2-layer model with inputs and logits of order 1 agree to float32 rounding of the sums,
well below 1e-5 (about a hundred terms of magnitude below 1 per sum, 2**-24 relative each; the
einsum of the effective-convolution factors sums in another order, still within 1e-7). A merge
adds ΔW to W once and an unmerge subtracts it again: within 2 ulps of W's magnitude (atol 1e-6).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_modules import make
from torch import nn

import peftctl
from peftctl import LoHaConfig, LoKrConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the LoHa / LoKr reference; install the test extra")

ATOL = 1e-5
METHODS = {"loha": ("LoHaConfig", "hada_"), "lokr": ("LoKrConfig", "lokr_")}


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.lin0 = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.lin0(self.conv(x).flatten(1))

    @staticmethod
    def inputs(n=4):
        return torch.randn(n, 4, 5, 5)


# case -> (method, model kind, config keywords); every case starts from random factors (init_weights false).
CASES = {
    "loha-llama-patterns": ("loha", "llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4,
                                              "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6},
                                              "alpha_pattern": {"v_proj": 3.0}, "modules_to_save": ["lm_head"]}),
    # (peftctl's all-linear with layers_to_transform filters the layers, PEFT's LoKr adapts all: LoRA's rule.)
    "lokr-llama-patterns-layers": ("lokr", "llama", {"target_modules": ["q_proj", "gate_proj", "down_proj"],
                                                     "r": 2, "alpha": 6,
                                                     "rank_pattern": {"down_proj": 16}, "alpha_pattern": {"q_proj": 1.5},
                                                     "layers_to_transform": [1]}),
    "loha-all-linear": ("loha", "llama", {"target_modules": "all-linear", "r": 2}),
    "lokr-decompose-both-factor": ("lokr", "llama", {"target_modules": ["q_proj", "up_proj"], "r": 1,
                                                     "decompose_both": True, "decompose_factor": 4}),
    "lokr-init-lycoris": ("lokr", "mlp", {"target_modules": ["lin0", "lin1"], "init_weights": "lycoris", "r": 2}),
    "loha-mlp": ("loha", "mlp", {"target_modules": ["lin0", "lin1"], "r": 3, "exclude_modules": ["lin1"]}),
    "loha-conv2d": ("loha", "conv2d", {"target_modules": ["conv", "pw"], "r": 2}),
    "loha-conv2d-effective": ("loha", "conv2d", {"target_modules": ["conv", "pw"], "r": 2, "use_effective_conv2d": True}),
    "lokr-conv2d": ("lokr", "conv2d", {"target_modules": ["conv", "pw"], "r": 1}),
    "lokr-conv2d-effective": ("lokr", "conv2d", {"target_modules": ["conv"], "r": 1, "use_effective_conv2d": True}),
    "lokr-conv2d-full": ("lokr", "conv2d", {"target_modules": ["conv"], "r": 8}),
    "loha-conv1d-effective": ("loha", "conv1d", {"target_modules": ["conv"], "r": 2, "use_effective_conv2d": True}),
    "lokr-conv1d": ("lokr", "conv1d", {"target_modules": ["conv"], "r": 1}),
    "lokr-conv1d-full": ("lokr", "conv1d", {"target_modules": ["conv"], "r": 8}),  # PEFT's 2-d ⊗ 3-d kron layout
    "loha-grouped": ("loha", "grouped", {"target_modules": ["conv"], "r": 2, "use_effective_conv2d": True}),
    "lokr-grouped": ("lokr", "grouped", {"target_modules": ["conv"], "r": 1, "decompose_both": True}),
}


@pytest.fixture
def build(tiny_llama):
    def model(kind):
        if kind == "llama":
            return tiny_llama()
        torch.manual_seed(0)
        return Grouped() if kind == "grouped" else make(kind)

    return model


def inputs(kind):
    if kind == "llama":
        return {"input_ids": torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(7))}
    torch.manual_seed(7)
    return {"x": (Grouped if kind == "grouped" else type(make(kind))).inputs()}


def out(model, x, grad=False):
    with torch.set_grad_enabled(grad):
        return model(x["x"]) if "x" in x else model(**x).logits


def configs(method, **kw):
    name = METHODS[method][0]
    return getattr(peftctl, name)(**kw), getattr(peft, name)(**kw)


def both(build, method, kind, seed=3, **kw):
    """peftctl's and PEFT's model of `kind` with the same adapter from the same seed."""
    mine, ref = configs(method, **kw)
    torch.manual_seed(seed)
    ours = get_peft_model(build(kind), mine)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(kind), ref)
    return ours, theirs


def keys_and_shapes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


def test_default_targets_are_peft_s():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
    )

    from peftctl.adapters.matching import DEFAULT_TARGETS

    # PEFT's LoHa and LoKr tables are copies of its LoRA table, which peftctl's default is.
    assert LoHaConfig.default_target_modules is None and LoKrConfig.default_target_modules is None
    assert TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING == DEFAULT_TARGETS
    assert TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING == DEFAULT_TARGETS


def test_config_fields_are_peft_s():
    for method, (name, _) in METHODS.items():
        theirs = getattr(peft, name)().to_dict()
        ours = getattr(peftctl, name)().to_peft_dict()
        assert set(theirs) - {"peft_version", "auto_mapping"} == set(ours), method
        for key, value in ours.items():
            assert theirs[key] == value, (method, key)


@pytest.mark.parametrize("case", CASES)
def test_both_ways_with_peft(build, tmp_path, case, capsys):
    method, kind, kw = CASES[case]
    x = inputs(kind)
    ours, theirs = both(build, method, kind, **{"init_weights": False, **kw})
    ours.eval()
    theirs.eval()
    # Same seed, same creation order: PEFT's factors from the start, by name and value.
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ref = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == ref.keys()
    assert all(torch.equal(p, ref[n]) for n, p in mine.items())
    torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
    if kw.get("init_weights") != "lycoris":  # (which starts with W2 at zero)
        with ours.disable_adapter():
            assert (out(ours, x) - out(theirs, x)).abs().max() > 1e-3  # random factors: the adapter matters
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
    assert any(METHODS[method][1] in k for k in saved)
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "r", "alpha", "rank_pattern", "alpha_pattern", "init_weights", "use_effective_conv2d",
                  "modules_to_save", "layers_to_transform", "exclude_modules", "decompose_both", "decompose_factor"):
        assert cfgs[0].get(field) == cfgs[1].get(field), field


@pytest.mark.parametrize("method", METHODS)
def test_lokr_conv1d_with_a_low_rank_effective_w2_works_where_peft_fails(method):
    """PEFT's LoKr fails there (torch.kron on the rebuilt W2's strides); LoHa's works in both."""
    torch.manual_seed(0)
    model = get_peft_model(make("conv1d"), configs(method, target_modules=["conv"], r=1, init_weights=False,
                                                   use_effective_conv2d=True)[0]).eval()
    layer = model.base_model.model.conv
    x = torch.randn(3, 4, 9)
    delta = layer.delta_weight("default")
    torch.testing.assert_close(layer(x), layer.base_layer(x) + nn.functional.conv1d(x, delta, padding=1),
                               rtol=0, atol=ATOL)
    assert (delta.abs() > 0).any()


@pytest.mark.parametrize("case", ["loha-llama-patterns", "lokr-llama-patterns-layers", "loha-conv2d-effective",
                                  "lokr-conv1d-full"])
def test_merged_equals_unmerged_and_peft_s_merge(build, case):
    method, kind, kw = CASES[case]
    x = inputs(kind)
    ours, theirs = both(build, method, kind, init_weights=False, **kw)
    ours.eval()
    theirs.eval()
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    unmerged = out(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(out(ours, x), unmerged, rtol=0, atol=ATOL)
    ours.unmerge_adapter()
    for k, v in ours.get_base_model().state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    torch.testing.assert_close(out(merged, x), unmerged, rtol=0, atol=ATOL)
    ours_sd, theirs_sd = merged.state_dict(), peft_merged.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for k in theirs_sd:
        torch.testing.assert_close(ours_sd[k], theirs_sd[k], rtol=0, atol=ATOL, msg=k)


@pytest.mark.parametrize("case", ["loha-llama-patterns", "lokr-decompose-both-factor", "loha-conv2d",
                                  "lokr-conv2d-effective"])
def test_training_mode_outputs_and_gradients_are_peft_s(build, case):
    """With both dropouts on, a seed gives PEFT's masks (the same draws in the same order, on the
    CPU), so training-mode outputs agree; and the gradients of every factor (LoHa's through its
    recomputing backward) agree with PEFT's."""
    method, kind, kw = CASES[case]
    extra = {"rank_dropout": 0.3, "module_dropout": 0.2, **({"rank_dropout_scale": True} if method == "lokr" else {})}
    ours, theirs = both(build, method, kind, init_weights=False, **kw, **extra)
    ours.train()
    theirs.train()
    x = inputs(kind)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        mine = out(ours, x, grad=True)
        torch.manual_seed(seed)
        ref = out(theirs, x, grad=True)
        torch.testing.assert_close(mine, ref, rtol=0, atol=ATOL)
    (mine ** 2).mean().backward()
    (ref ** 2).mean().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == theirs_grads.keys()
    for n, g in grads.items():
        if g is None or theirs_grads[n] is None:  # a layer module dropout left out (in both)
            assert g is None and theirs_grads[n] is None, n
        else:
            torch.testing.assert_close(g, theirs_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert sum(g is not None and bool(g.abs().max() > 0) for g in grads.values()) >= len(grads) / 2


@pytest.mark.parametrize("effective", [False, True])
def test_loha_backward_is_the_formula_s(effective):
    """LoHa's product keeps only the factors and recomputes in its backward; its gradients equal
    autograd's of the plain formula, in float64 to rounding. (PEFT 0.21's effective-convolution
    backward, HadaWeightCP, gives other gradients for hada_w1_a and hada_w2_a: its training there
    follows a wrong gradient; the forward, and so files, agree.)"""
    from peftctl.adapters.loha.layer import HadamardProduct, _rebuild

    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 5), (2, 4)] if effective else [(5, 2), (2, 4)]
    factors = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes * 2]
    n = len(shapes)
    upstream = torch.randn(_rebuild(factors[:n]).shape, generator=gen, dtype=torch.float64)
    plain = torch.autograd.grad(_rebuild(factors[:n]) * _rebuild(factors[n:]) * 0.7, factors, upstream)
    ours = torch.autograd.grad(HadamardProduct.apply(0.7, n, *factors), factors, upstream)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_several_adapters_as_peft(build, tmp_path, method):
    """add / set (one, then both) / disable / delete, and merging two at once, against PEFT."""
    second = {"target_modules": ["q_proj", "down_proj"], "r": 2, "alpha": 4, "init_weights": False}
    models = []
    for lib in (peftctl, peft):
        cls = getattr(lib, METHODS[method][0])
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lib.get_peft_model(build("llama"), cls(init_weights=False))
            m.add_adapter("b", cls(**second))
        models.append(m.eval())
    ours, theirs = models
    x = inputs("llama")
    torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
    for names in ("b", ["default", "b"]):
        ours.set_adapter(names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    both_active = out(ours, x)
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(out(ours, x), out(theirs, x), rtol=0, atol=ATOL)
        assert (out(ours, x) - both_active).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_ours = ours.merge_and_unload(adapter_names=["default", "b"]).state_dict()
        m_theirs = theirs.merge_and_unload(adapter_names=["default", "b"]).state_dict()
    for k in m_theirs:
        torch.testing.assert_close(m_ours[k], m_theirs[k], rtol=0, atol=ATOL, msg=k)

    cls = getattr(peftctl, METHODS[method][0])
    torch.manual_seed(5)
    ours = get_peft_model(build("llama"), cls(init_weights=False))
    ours.add_adapter("b", cls(**second))
    ours.delete_adapter("default")
    assert list(ours.peft_config) == ["b"] and ours.active_adapters == ["b"]
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.adapter_names == ["b"] and list(layer.r) == ["b"] and list(layer.scaling) == ["b"]
    ours.save_pretrained(tmp_path)
    assert {k.split(".")[-2] for k in keys_and_shapes(tmp_path / "b")} == {"q_proj", "down_proj"}


@pytest.mark.parametrize("method", METHODS)
def test_what_peft_cannot_do_either_is_refused_clearly(build, method):
    from tiny_modules import tiny_gpt2

    cls = getattr(peftctl, METHODS[method][0])
    model = get_peft_model(build("llama"), cls()).eval()
    ids = torch.randint(0, 300, (2, 5))
    kind = cls.peft_type
    with pytest.raises(ValueError, match=rf"adapter_names \(a mixed batch\) is not available for {kind} adapters"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match=rf"add_weighted_adapter is not defined for {kind} adapters \(PEFT defines "
                                         "it for LoRA and IA3 only\\)"):
        model.add_weighted_adapter(["default"], [1.0], "x")
    with pytest.raises(ValueError, match=f"resize_adapter_rank is defined for LoRA adapters only; this model holds {kind}"):
        model.resize_adapter_rank("default", 2)
    with pytest.raises(TypeError, match=r"module transformer.h.0.attn.c_attn is a transformers.pytorch_utils.Conv1D; "
                                        r"Lo(Ha|Kr) here supports: .*torch.nn.modules.linear.Linear"):
        get_peft_model(tiny_gpt2(), cls(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match=r"module emb is a torch.nn.modules.sparse.Embedding"):
        get_peft_model(make("emb"), cls(target_modules=["emb"]))
    with pytest.raises(ValueError, match="rank_pattern key 'o_proj' matches no module that target_modules selects"):
        cls(target_modules=["q_proj"], rank_pattern={"o_proj": 4})
    with pytest.raises(ValueError, match="rank_dropout"):
        cls(rank_dropout=1.0)
    with pytest.raises(ValueError, match="this model holds .* adapters; a lora adapter cannot be added"):
        model.add_adapter("l", peftctl.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_alpha'; did you mean alpha"):
        cls(lora_alpha=16)  # PEFT's LoHa/LoKr field is alpha (its own docstring's example says lora_alpha)


def test_both_train_from_the_python_api_and_peft_loads_the_result(tiny_llama, tmp_path):
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    for method, (name, prefix) in METHODS.items():
        model = get_peft_model(tiny_llama(), getattr(peftctl, name)(r=4, rank_dropout=0.1, module_dropout=0.1))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(prefix in n for n in trainable)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        model.train()
        torch.manual_seed(0)
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.05, (method, losses)
        model.save_pretrained(tmp_path / method)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / method)
        torch.testing.assert_close(out(theirs.eval(), {"input_ids": ids}), out(model.eval(), {"input_ids": ids}),
                                   rtol=0, atol=ATOL)


# ---- quantized bases (bitsandbytes, on CPU) ----------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bases(tiny_model_dir, tmp_path, bits):
    """8-bit: PEFT's generic LyCORIS layers run over Linear8bitLt, so files move both ways. 4-bit:
    PEFT's fail (they reshape ΔW to the packed weight's shape); peftctl's follow the formula."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes provides the quantized layers")
    from test_quantized import loaded_by_transformers, quantized

    from peftctl.bnb import dequantize

    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    for method in METHODS:
        mine, ref = configs(method, target_modules=["q_proj", "down_proj"], r=2, init_weights=False)
        torch.manual_seed(0)
        ours = get_peft_model(loaded_by_transformers(tiny_model_dir, bits), mine).eval()
        layer = ours.base_model.model.model.layers[1].mlp.down_proj
        assert type(layer).__name__ == "QuantizedLinear"
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            delta = layer.delta_weight("default")
            torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, rtol=0, atol=ATOL)
            if bits == 4:  # the plain path: the dequantized weight, in float32
                torch.testing.assert_close(layer(x), x @ (dequantize(layer.base_layer) + delta).T, rtol=0, atol=ATOL)
        with pytest.raises(ValueError, match="cannot merge into a quantized Linear(4bit|8bitLt) weight"):
            ours.merge_and_unload()
        if bits == 8:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = peft.get_peft_model(quantized(tiny_model_dir, bits), ref).eval()
                expected = out(theirs, {"input_ids": ids})
                torch.testing.assert_close(out(ours, {"input_ids": ids}), expected, rtol=0, atol=ATOL)
                theirs.save_pretrained(tmp_path / method)
                back = PeftModel.from_pretrained(loaded_by_transformers(tiny_model_dir, bits), tmp_path / method)
                torch.testing.assert_close(out(back.eval(), {"input_ids": ids}), expected, rtol=0, atol=ATOL)


def test_pattern_checks_are_lora_s():
    """rank_pattern ranks and pattern keys are checked as LoRA checks them (one shared check)."""
    from peftctl import LoHaConfig, LoKrConfig, LoraConfig

    for cls in (LoraConfig, LoHaConfig, LoKrConfig):
        with pytest.raises(ValueError, match=r"alpha_pattern key '\(q' is not a valid regular expression"):
            cls(alpha_pattern={"(q": 4})
        with pytest.raises(ValueError, match=r"rank_pattern ranks must be >= 1 \(got 0 for 'q_proj'\)"):
            cls(rank_pattern={"q_proj": 0})
