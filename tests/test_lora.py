"""The LoRA core against the plain formula, and the invariants every adapter must keep."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftctl import LoraConfig, PeftModel, get_peft_model
from peftctl.adapters.lora.layer import Linear as LoraLinear


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 6)
        self.lm_head = nn.Linear(6, 4)

    def forward(self, x):
        return self.lm_head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def random_lora(model, **kw):
    torch.manual_seed(1)
    cfg = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], **kw})
    return get_peft_model(model, cfg)


def test_forward_matches_plain_formula_in_float64():
    torch.manual_seed(0)
    base = MLP().double()
    x = torch.randn(3, 10, dtype=torch.float64)
    w0, b0 = base.lin0.weight.clone(), base.lin0.bias.clone()
    pm = random_lora(base)
    layer = pm.base_model.model.lin0
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = x @ w0.T + b0 + (x @ a.T @ b.T) * (8 / 4)
    assert torch.allclose(layer(x), expected, atol=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_alpha_over_r_or_sqrt_r(rslora):
    pm = random_lora(MLP(), r=16, lora_alpha=8, use_rslora=rslora)
    assert pm.base_model.model.lin0.scaling["default"] == (8 / math.sqrt(16) if rslora else 8 / 16)


def test_default_init_leaves_outputs_unchanged():
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(5, 10)
    ref = base(x)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    assert torch.equal(pm(x), ref)
    assert torch.count_nonzero(pm.base_model.model.lin0.lora_A["default"].weight) > 0


def test_merged_equals_unmerged_equals_merge_and_unload():
    torch.manual_seed(0)
    x = torch.randn(5, 10)
    pm = random_lora(MLP())
    unmerged = pm(x)
    pm.merge_adapter()
    merged = pm(x)
    pm.merge_adapter()  # merging twice changes nothing
    assert torch.allclose(pm(x), merged, atol=0)
    pm.unmerge_adapter()
    assert torch.allclose(pm(x), unmerged, atol=1e-6)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.allclose(plain(x), unmerged, atol=1e-5)


def test_disabled_adapter_gives_base_outputs_exactly_and_comes_back():
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(5, 10)
    ref = base(x)
    pm = random_lora(base)
    with_adapter = pm(x)
    assert not torch.allclose(with_adapter, ref)
    with pm.disable_adapter():
        assert torch.equal(pm(x), ref)
    assert torch.equal(pm(x), with_adapter)


def test_only_adapter_parameters_train():
    torch.manual_seed(0)
    pm = random_lora(MLP())
    names = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert names == {f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("lin0", "lin1") for ab in "AB"}
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm(torch.randn(4, 10)).sum().backward()
    opt.step()
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n


def test_unload_restores_the_base_model():
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(2, 10)
    ref = base(x)
    pm = random_lora(base)
    pm.merge_adapter()
    plain = pm.unload()
    assert isinstance(plain.lin0, nn.Linear) and torch.allclose(plain(x), ref, atol=1e-6)


def test_save_then_load_is_identical(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 10)
    base_state = MLP().state_dict()
    m = MLP()
    m.load_state_dict(base_state)
    pm = random_lora(m, r=3, lora_alpha=5, use_rslora=True)
    out = pm(x)
    pm.save_pretrained(tmp_path)
    fresh = MLP()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(x), out)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    trainable = PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_adapter_name_makes_no_difference(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 10)
    state = MLP().state_dict()
    outs = []
    for name in ("default", "other"):
        m = MLP()
        m.load_state_dict(state)
        torch.manual_seed(1)
        pm = get_peft_model(m, LoraConfig(r=4, target_modules=["lin0"], init_lora_weights=False), adapter_name=name)
        outs.append(pm(x))
        pm.save_pretrained(tmp_path / name)
    assert torch.equal(outs[0], outs[1])
    assert (tmp_path / "default" / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "other" / "adapter_model.safetensors").exists()  # PEFT's subfolder layout


def test_dropout_zero_is_no_dropout_and_dropout_applies_in_training():
    pm = random_lora(MLP(), lora_dropout=0.0)
    assert isinstance(pm.base_model.model.lin0.lora_dropout["default"], nn.Identity)
    pm = random_lora(MLP(), lora_dropout=0.5)
    x = torch.randn(64, 10)
    pm.train()
    assert not torch.equal(pm(x), pm(x))
    pm.eval()
    assert torch.equal(pm(x), pm(x))


def test_bf16_base_keeps_fp32_adapter_weights_and_bf16_compute():
    torch.manual_seed(0)
    pm = random_lora(MLP().to(torch.bfloat16))
    layer = pm.base_model.model.lin0
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 10, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


# ---- target selection ------------------------------------------------------------------------


def targets(model, spec, **kw):
    pm = get_peft_model(model, LoraConfig(target_modules=spec, **kw))
    return sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLinear))


def test_target_names_match_exactly_or_as_dotted_suffix(tiny_llama):
    got = targets(tiny_llama(), ["q_proj", "layers.1.self_attn.v_proj"])
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matches no module"):
        targets(tiny_llama(), ["proj"])


def test_target_regex_is_a_full_match(tiny_llama):
    got = targets(tiny_llama(), r".*\.0\.mlp\.(up|down)_proj")
    assert got == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]


def test_all_linear_skips_the_output_head(tiny_llama):
    got = targets(tiny_llama(), "all-linear")
    assert len(got) == 2 * 7 and not any("lm_head" in n for n in got)


def test_exclude_modules(tiny_llama):
    got = targets(tiny_llama(), "all-linear", exclude_modules=["o_proj", "mlp.down_proj"])
    assert len(got) == 2 * 5


def test_no_match_error_lists_existing_names(tiny_llama):
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        targets(tiny_llama(), ["qproj"])


def test_unsupported_module_type_is_named(tiny_llama):
    with pytest.raises(TypeError, match=r"model.embed_tokens is a torch.nn.modules.sparse.Embedding"):
        targets(tiny_llama(), ["embed_tokens"])


def test_default_targets_for_llama(tiny_llama):
    assert targets(tiny_llama(), None) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_print_trainable_parameters_uses_peft_format(capsys, tiny_llama):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    pm.print_trainable_parameters()
    trainable, total = pm.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    # r=8 on q_proj (64x64) and v_proj (64->32) in 2 layers: 8*(64+64) + 8*(64+32) per layer
    assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32))
