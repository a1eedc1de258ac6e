"""The invariants every LoRA option keeps, over every base-layer type (the way PEFT tests its tuners
on tiny modules): merged = unmerged = merge_and_unload; merging twice changes nothing; disabled
adapters give the base model's outputs exactly and come back; only adapter parameters (and
modules_to_save, trained biases) change in training; save then load is identical; the adapter's
name makes no difference; default inits leave the outputs unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_modules import make

from peftctl import LoraConfig, PeftModel, get_peft_model
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper

MLP_TARGETS = {"target_modules": ["lin0", "lin1"]}
CASES = [
    ("mlp", {**MLP_TARGETS}),
    ("mlp", {**MLP_TARGETS, "use_rslora": True, "lora_alpha": 3}),
    ("mlp", {**MLP_TARGETS, "lora_dropout": 0.2}),
    ("mlp", {**MLP_TARGETS, "use_dora": True}),
    ("mlp", {**MLP_TARGETS, "use_dora": True, "lora_dropout": 0.2}),
    ("mlp", {**MLP_TARGETS, "bias": "all"}),
    ("mlp", {**MLP_TARGETS, "bias": "lora_only"}),
    ("mlp", {**MLP_TARGETS, "lora_bias": True}),
    ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["lm_head"]}),
    ("mlp", {**MLP_TARGETS, "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 5}}),
    ("mlp", {"target_modules": r"lin\d", "exclude_modules": ["lin1"]}),
    ("mlp", {"target_modules": "all-linear"}),
    ("emb", {"target_modules": ["emb", "lin0"]}),
    ("emb", {"target_modules": ["emb"], "use_dora": True}),
    ("conv1d", {"target_modules": ["conv", "lin0"]}),
    ("conv1d", {"target_modules": ["conv"], "use_dora": True}),
    ("conv1d", {"target_modules": ["conv"], "lora_bias": True, "bias": "lora_only"}),
    ("conv2d", {"target_modules": ["conv", "pw"]}),
    ("conv2d", {"target_modules": ["conv", "pw"], "use_dora": True, "lora_dropout": 0.2}),
    ("conv3d", {"target_modules": ["conv"], "use_dora": True}),
    ("gpt2style", {"target_modules": ["c_fc", "c_proj"]}),
    ("gpt2style", {"target_modules": ["c_fc", "c_proj"], "use_dora": True}),
    ("gpt2style", {"target_modules": ["c_fc"], "lora_bias": True, "bias": "all"}),
]
INIT_CASES = [
    ("mlp", {**MLP_TARGETS, "init_lora_weights": init}) for init in (True, "gaussian", "pissa", "pissa_niter_4", "olora")
] + [
    ("mlp", {**MLP_TARGETS, "use_dora": True}),
    ("emb", {"target_modules": ["emb"]}),
    ("conv2d", {"target_modules": ["conv", "pw"], "use_dora": True}),
    ("gpt2style", {"target_modules": ["c_fc"], "init_lora_weights": "pissa", "use_dora": True}),
    ("gpt2style", {"target_modules": ["c_fc"], "init_lora_weights": "olora"}),
]


def case_id(case):
    kind, kw = case
    parts = [f"{k}={v}" for k, v in kw.items() if k != "target_modules"]
    return "-".join([kind, *parts]) or kind


def build(kind, kw, name="default", seed=1):
    """The tiny model with a random adapter (so it is not a no-op) in eval mode, and the input."""
    base = make(kind)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw}), name)
    torch.manual_seed(seed)
    return model.eval(), type(base).inputs()


def train_a_little(model, adapters_only=False):
    """Trained-looking weights: every trainable tensor moved (heads, biases), or only the adapters'."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (not adapters_only or ".lora_" in name or "modules_to_save" in name):
                p.add_(0.1 * torch.randn_like(p))


def out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_merged_equals_unmerged_equals_merge_and_unload(case):
    model, x = build(*case)
    train_a_little(model)
    unmerged = out(model, x)
    model.merge_adapter()
    merged = out(model, x)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    model.merge_adapter()  # merging twice changes nothing
    assert torch.equal(out(model, x), merged)
    model.unmerge_adapter()
    assert torch.allclose(out(model, x), unmerged, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer | ModulesToSaveWrapper) for m in plain.modules())
    assert torch.allclose(out(plain, x), unmerged, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_disabled_adapter_gives_base_outputs_and_comes_back(case):
    kind, kw = case
    base = make(kind)
    x = type(base).inputs()
    reference = out(copy.deepcopy(base), x)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(**{"r": 4, "init_lora_weights": False, **kw})).eval()
    train_a_little(model, adapters_only=True)
    adapted = out(model, x)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(out(model, x), reference)
    assert torch.equal(out(model, x), adapted)
    assert torch.equal(out(model.unload(), x), reference)  # unload: the base model as it was


def expected_trainable(name: str, kw: dict) -> bool:
    if ".lora_" in name or ".modules_to_save.default." in name:
        return True
    if name.endswith(".bias") and "original_module" not in name:
        return kw.get("bias") == "all" or (kw.get("bias") == "lora_only" and name.endswith("base_layer.bias"))
    return False


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_only_adapter_parameters_train(case):
    kind, kw = case
    model, x = build(kind, kw)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if expected_trainable(n, kw)}
    trained, total = model.get_nb_trainable_parameters()
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().sum().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("case", CASES + INIT_CASES[2:5], ids=case_id)
def test_save_then_load_is_identical(case, tmp_path):
    kind, kw = case
    model, x = build(kind, kw)
    train_a_little(model)
    expected = out(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(kind), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.allclose(out(loaded, x), expected, atol=1e-6)
    trainable = PeftModel.from_pretrained(make(kind), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_adapter_name_makes_no_difference(case, tmp_path):
    (a, x), (b, _) = build(*case, name="default"), build(*case, name="other")
    for m in (a, b):
        torch.manual_seed(5)
        train_a_little(m)
    assert torch.equal(out(a, x), out(b, x))
    a.save_pretrained(tmp_path)
    b.save_pretrained(tmp_path)  # "other" goes to a subfolder of its name, as in PEFT
    first = PeftModel.from_pretrained(make(case[0]), tmp_path)
    if case[1].get("bias", "none") == "none":
        first.load_adapter(tmp_path / "other", adapter_name="other")
        first.set_adapter("other")
    else:  # one adapter at most trains the base model's biases (PEFT's rule): "other" alone
        with pytest.raises(ValueError, match="only one adapter may"):
            first.load_adapter(tmp_path / "other", adapter_name="other")
        first = PeftModel.from_pretrained(make(case[0]), tmp_path / "other", adapter_name="other")
    assert torch.equal(out(first, x), out(a, x))


@pytest.mark.parametrize("case", INIT_CASES, ids=case_id)
def test_default_inits_leave_outputs_unchanged(case):
    kind, kw = case
    base = make(kind)
    x = type(base).inputs()
    reference = out(copy.deepcopy(base), x)
    model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, **kw})).eval()
    if kw.get("init_lora_weights", True) in (True, "gaussian"):
        assert torch.equal(out(model, x), reference)  # B (or embedding A) is exactly zero
    else:  # PiSSA / OLoRA: the base weight becomes W - scaling * B A
        assert torch.allclose(out(model, x), reference, atol=1e-5)
        target = kw["target_modules"][0]
        assert not torch.allclose(model.base_model.model.get_submodule(target).weight,
                                  make(kind).get_submodule(target).weight, atol=1e-3)


@pytest.mark.parametrize("kind, kw", [
    ("mlp", {**MLP_TARGETS}), ("mlp", {**MLP_TARGETS, "use_dora": True}), ("emb", {"target_modules": ["emb"]}),
    ("conv2d", {"target_modules": ["conv", "pw"]}), ("gpt2style", {"target_modules": ["c_fc"], "use_dora": True}),
    ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["lm_head"]}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_mixed_batch_rows_use_their_own_adapter(kind, kw):
    model, x = build(kind, kw, name="a")
    torch.manual_seed(2)
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, **kw))
    names = ["a", "b", "__base__", "b", "a", "__base__"]
    mixed = out_kw(model, x, adapter_names=names)
    for name in ("a", "b", "__base__"):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                alone = out(model, x[rows])
        else:
            model.set_adapter(name)
            alone = out(model, x[rows])
        assert torch.allclose(mixed[rows], alone, atol=1e-6), name


def out_kw(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw)


BAD_NAMES = ["/abs/path", "../escape", "..", "sub/dir", "back\\slash", "a.b", "", "nul\0byte"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_adapter_names_are_plain_names(name, tmp_path):
    """A name becomes a subfolder on save: every way in refuses a path, before anything is written."""
    model, _ = build("mlp", MLP_TARGETS)
    model.save_pretrained(tmp_path / "saved")
    cfg = LoraConfig(**MLP_TARGETS)
    calls = [
        lambda: model.add_adapter(name, cfg),
        lambda: model.load_adapter(tmp_path / "saved", adapter_name=name),
        lambda: PeftModel.from_pretrained(make("mlp"), tmp_path / "saved", adapter_name=name),
        lambda: get_peft_model(make("mlp"), cfg, adapter_name=name),
        lambda: model.add_weighted_adapter(["default"], [1.0], name, combination_type="linear"),
        lambda: model.save_pretrained(tmp_path / "out", selected_adapters=[name]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="is not a plain name"):
            call()
    assert list(model.peft_config) == ["default"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "abs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
