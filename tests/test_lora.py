"""The LoRA layers against their plain formulas (float64), target selection, several adapters,
merging details, rank resizing, and PEFT's Python API (names, accounting, AutoPeftModel)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_modules import make
from torch import nn

from peftctl import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peftctl.adapters.lora.layer import Linear as LoraLinear


def random_lora(model, **kw):
    torch.manual_seed(1)
    cfg = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], **kw})
    return get_peft_model(model, cfg)


def factors(layer, name="default"):
    if name in layer.lora_A:
        return layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    return layer.lora_embedding_A[name].double(), layer.lora_embedding_B[name].double()


# ---- the formulas, float64 -------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_linear_forward_matches_the_formula(dora):
    base = make("mlp", double=True)
    x = torch.randn(3, 10, dtype=torch.float64)
    w, bias = base.lin0.weight.detach().clone(), base.lin0.bias.detach().clone()
    layer = random_lora(base, use_dora=dora).base_model.model.lin0
    a, b = factors(layer)
    delta = (b @ a) * (8 / 4)
    if dora:  # m / ||W + s B A|| (row norms) times (W + s B A), m trained, starting at the norms
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].mul_(1.5)
        m = layer.lora_magnitude_vector["default"].double()
        expected = x @ ((m / (w + delta).norm(dim=1))[:, None] * (w + delta)).T + bias
    else:
        expected = x @ (w + delta).T + bias
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_conv1d_transformers_embedding_and_conv2d_match_their_formulas():
    gpt = make("gpt2style", double=True)
    w, bias = gpt.c_fc.weight.detach().clone(), gpt.c_fc.bias.detach().clone()  # (in, out)
    layer = random_lora(gpt, target_modules=["c_fc"]).base_model.model.c_fc
    a, b = factors(layer)
    x = torch.randn(3, 10, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ (w + 2 * (b @ a).T) + bias, atol=1e-6)

    emb = make("emb", double=True)
    table = emb.emb.weight.detach().clone()
    layer = random_lora(emb, target_modules=["emb"]).base_model.model.emb
    a, b = factors(layer)  # A (r, vocab), B (dim, r)
    ids = torch.randint(0, 50, (2, 5))
    assert torch.allclose(layer(ids), F.embedding(ids, table + 2 * (b @ a).T), atol=1e-6)

    conv = make("conv2d", double=True)
    w, bias = conv.conv.weight.detach().clone(), conv.conv.bias.detach().clone()
    layer = random_lora(conv, target_modules=["conv"]).base_model.model.conv
    a, b = factors(layer)  # A (r, in, 3, 3), B (out, r, 1, 1)
    delta = (b.flatten(1) @ a.flatten(1)).view(w.shape) * 2
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    assert torch.allclose(layer(x), F.conv2d(x, w + delta, bias, stride=2), atol=1e-6)


def test_scalings_are_what_the_formula_says():
    cfg = {"r": 16, "lora_alpha": 8, "target_modules": ["lin0", "lin1", "lm_head"],
           "rank_pattern": {"lin1": 4}, "alpha_pattern": {"lm_head": 2}}
    for rslora in (False, True):
        layers = random_lora(make("mlp"), use_rslora=rslora, **cfg).base_model.model
        root = math.sqrt if rslora else (lambda r: r)
        assert layers.lin0.scaling["default"] == 8 / root(16)
        assert layers.lin1.scaling["default"] == 8 / root(4) and layers.lin1.r["default"] == 4
        assert layers.lm_head.scaling["default"] == 2 / root(16)
        assert layers.lin1.lora_A["default"].weight.shape == (4, 20)


def test_dropout_zero_is_no_dropout_and_dropout_applies_in_training():
    pm = random_lora(make("mlp"), lora_dropout=0.0)
    assert isinstance(pm.base_model.model.lin0.lora_dropout["default"], nn.Identity)
    pm = random_lora(make("mlp"), lora_dropout=0.5)
    x = torch.randn(64, 10)
    pm.train()
    assert not torch.equal(pm(x), pm(x))
    pm.eval()
    assert torch.equal(pm(x), pm(x))


def test_bf16_base_keeps_fp32_adapter_weights_and_bf16_compute():
    pm = random_lora(make("mlp").to(torch.bfloat16), use_dora=True)
    layer = pm.base_model.model.lin0
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_magnitude_vector["default"].dtype == torch.float32
    assert layer(torch.randn(2, 10, dtype=torch.bfloat16)).dtype == torch.bfloat16


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


def test_layers_to_transform(tiny_llama):
    assert targets(tiny_llama(), ["q_proj", "up_proj"], layers_to_transform=1, layers_pattern="layers") == [
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert len(targets(tiny_llama(), "all-linear", layers_to_transform=[0])) == 7
    with pytest.raises(ValueError, match="layers_to_transform cannot be combined with a regex"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_modules_to_save_are_not_adapted_and_must_exist(tiny_llama):
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]))
    assert type(pm.base_model.model.lm_head).__name__ == "ModulesToSaveWrapper"
    with pytest.raises(ValueError, match=r"modules_to_save \['score'\] matches no module.*lm_head"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))


def test_no_match_error_lists_existing_names(tiny_llama):
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        targets(tiny_llama(), ["qproj"])


def test_unsupported_module_type_is_named(tiny_llama):
    with pytest.raises(TypeError, match=r"model.norm is a transformers\..*LlamaRMSNorm; LoRA here supports: .*Linear"):
        targets(tiny_llama(), ["model.norm"])


def test_default_targets_for_llama(tiny_llama):
    assert targets(tiny_llama(), None) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


# ---- several adapters ------------------------------------------------------------------------


def test_several_active_adapters_add_up_and_can_be_deleted():
    x = torch.randn(4, 10)
    pm = random_lora(make("mlp"), target_modules=["lin0"])
    torch.manual_seed(2)
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    assert pm.active_adapter == "default"  # a new adapter starts inactive and frozen
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".other." in n)
    layer = pm.base_model.model.lin0
    base_out = F.linear(x, layer.weight, layer.bias)
    deltas = {n: layer.lora_delta(n, x) for n in ("default", "other")}
    pm.set_adapter(["default", "other"])
    assert pm.active_adapters == ["default", "other"]
    assert torch.allclose(layer(x), base_out + deltas["default"] + deltas["other"], atol=1e-6)
    assert all(p.requires_grad for n, p in pm.named_parameters() if ".lora_" in n)
    pm.delete_adapter("default")
    assert pm.active_adapters == ["other"] and "default" not in layer.lora_A
    assert torch.allclose(layer(x), base_out + deltas["other"], atol=1e-6)
    with pytest.raises(ValueError, match="no adapter named 'default'"):
        pm.set_adapter("default")


def test_mixed_batch_errors():
    pm = random_lora(make("mlp")).eval()
    with pytest.raises(ValueError, match="unknown adapters: nope"):
        pm(torch.randn(2, 10), adapter_names=["default", "nope"])
    pm.train()
    with pytest.raises(ValueError, match="for inference"):
        pm(torch.randn(2, 10), adapter_names=["default", "default"])


# ---- merging -----------------------------------------------------------------------------------


def test_safe_merge_refuses_nan_and_leaves_the_weights():
    pm = random_lora(make("mlp"))
    before = pm.base_model.model.lin0.weight.detach().clone()
    with torch.no_grad():
        pm.base_model.model.lin0.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(pm.base_model.model.lin0.weight, before)


def test_merging_into_tied_embeddings_unties_them(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    pm = random_lora(base, target_modules=["embed_tokens"]).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        merged = pm.merge_and_unload()
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)  # the head kept the base embedding
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False


def test_grow_rank_exactly_and_shrink_with_reported_error(tmp_path):
    x = torch.randn(5, 10)
    pm = random_lora(make("mlp"), r=4, rank_pattern={"lin1": 3}, use_rslora=True).eval()
    expected = pm(x)
    report = pm.resize_adapter_rank("default", 6)
    assert report["max_relative_error"] == 0.0 and pm.base_model.model.lin0.r["default"] == 6
    assert torch.allclose(pm(x), expected, atol=1e-6)
    pm.save_pretrained(tmp_path)  # the saved config keeps every module's scaling
    assert torch.allclose(PeftModel.from_pretrained(make("mlp"), tmp_path)(x), expected, atol=1e-6)
    report = pm.resize_adapter_rank("default", 2)
    layer = pm.base_model.model.lin0
    for row in report["modules"]:
        assert row["r_from"] == 6 and row["r"] == 2 and 0 < row["relative_error"] < 1
    # The reported error is the truncation's: compare with the deltas directly.
    full = make("mlp")
    torch.manual_seed(1)
    before = random_lora(full, r=4, rank_pattern={"lin1": 3}, use_rslora=True).base_model.model.lin0
    with torch.no_grad():
        d0, d1 = before.delta_weight("default"), layer.delta_weight("default")
    rel = float((d0 - d1).norm() / d0.norm())
    assert rel == pytest.approx(report["modules"][0]["relative_error"], rel=1e-3)


def test_grown_rank_s_new_rows_start_as_a_fresh_adapter_s():
    """Rows added by growing the rank are A's default init (PEFT's: kaiming-uniform with a=sqrt(5),
    i.e. U(-1/sqrt(in), 1/sqrt(in))), B's new columns zero: 63 new rows of 64 inputs, whose spread
    tells that init from a gaussian one (std 1/r) at a glance."""
    lin = nn.Linear(64, 8)
    pm = get_peft_model(nn.Sequential(lin), LoraConfig(r=1, target_modules=["0"], init_lora_weights=False))
    pm.resize_adapter_rank("default", 64)
    layer = pm.base_model.model[0]
    a, b = layer.lora_A["default"].weight[1:].detach(), layer.lora_B["default"].weight[:, 1:].detach()
    bound = 1 / math.sqrt(64)
    assert float(a.abs().max()) <= bound and not b.any()
    # The standard deviation of U(-b, b) is b/sqrt(3); over 4032 draws its estimate is within ~1%.
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


# ---- PEFT's API ----------------------------------------------------------------------------------


def test_print_trainable_parameters_uses_peft_format(capsys, tiny_llama):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    pm.print_trainable_parameters()
    trainable, total = pm.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    # r=8 on q_proj (64x64) and v_proj (64->32) in 2 layers: 8*(64+64) + 8*(64+32) per layer
    assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    # The base model's own methods and attributes, through the wrapper
    assert pm.num_parameters(only_trainable=True) == trainable
    assert pm.config.model_type == "llama"
    out = pm.generate(input_ids=torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_auto_peft_model_loads_base_and_adapter_from_the_adapter_folder(tiny_llama, tiny_model_dir, tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                 task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path, selected_adapters=["default"])
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, pm.eval()(input_ids=ids).logits)


def test_generate_with_a_mixed_batch(tiny_llama):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        adapter_name="a")
    torch.manual_seed(3)
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    ids = torch.randint(3, 300, (3, 6))
    names = ["b", "__base__", "a"]
    mixed = pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=5, do_sample=False)
    for i, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                alone = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=5, do_sample=False)
        else:
            pm.set_adapter(name)
            alone = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(mixed[i], alone[0]), name
    with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
        pm(input_ids=ids, adapter_names=["a", "b"])


def test_a_target_that_fails_leaves_the_model_as_it_was(tiny_llama):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = [n for n, _ in pm.named_modules()]
    with pytest.raises(TypeError, match="model.norm is a"):
        pm.add_adapter("bad", LoraConfig(r=2, target_modules=["q_proj", "v_proj", "model.norm"]))
    assert [n for n, _ in pm.named_modules()] == before and list(pm.peft_config) == ["default"]


def test_two_adapters_with_their_own_copy_of_a_module_cannot_be_active_together():
    """modules_to_save keeps one trained copy per adapter; only one copy can answer a forward
    (PEFT refuses too)."""
    pm = get_peft_model(make("mlp"), LoraConfig(target_modules=["lin0"], modules_to_save=["lm_head"]))
    pm.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\] each train their own copy"):
        pm.set_adapter(["default", "other"])


def test_save_pretrained_records_the_base_model_and_refuses_a_file(tiny_llama, tiny_model_dir, tmp_path):
    import json

    from safetensors import safe_open

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # the model's name_or_path, as PEFT
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{m}.weight"
                                    for i in (0, 1) for m in "AB"]  # no embedding matrices unless asked
    # An adapter added later (its config names no base model) records it when saved, as in PEFT.
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "two", selected_adapters=["other"])
    other = json.loads((tmp_path / "two" / "other" / "adapter_config.json").read_text())
    assert other["base_model_name_or_path"] == str(tiny_model_dir)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file; save_pretrained needs a folder"):
        pm.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_merged_adapter_cannot_be_deleted():
    pm = random_lora(make("mlp"), target_modules=["lin0"])
    pm.base_model.merge_adapter()
    with pytest.raises(ValueError, match="adapter 'default' is merged; unmerge it before deleting it"):
        pm.delete_adapter("default")
    pm.base_model.unmerge_adapter()
    pm.delete_adapter("default")
    assert not pm.peft_config
