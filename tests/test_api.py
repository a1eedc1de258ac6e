"""The Python API takes exactly PEFT's keywords: an unknown keyword is a TypeError everywhere, each
of PEFT 0.21's keywords either works as in PEFT or raises naming it; nested `disable_adapter`
blocks restore what they found; new adapter modules take the model's mode."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

import peftctl
from peftctl.adapters.lora.layer import LoraLayer

peft = pytest.importorskip("peft", reason="peft's signatures are the reference; install the test extra")


# ---- no **kwargs swallows a name -------------------------------------------------------------------

# Callables whose **kwargs are handed on to code that checks them (the transformers model's forward /
# generate / from_pretrained), or that always raise. Each but forward and generate (the model's own
# signature) is exercised below; so are the config classes' keywords (pydantic's `__init__(**data)`).
PASSED_ON = {"PeftModel.forward", "PeftModel.generate", "PeftModel.push_to_hub", "AutoPeftModel.from_pretrained"}


def public_callables():
    """(qualified name, function) for every public function and method of peftctl's exports."""
    seen = {}
    for export in peftctl.__all__:
        obj = getattr(peftctl, export)
        if inspect.isfunction(obj):
            seen[export] = obj
        elif inspect.isclass(obj):
            for klass in obj.__mro__:
                if not klass.__module__.startswith("peftctl"):
                    continue
                for attr, value in vars(klass).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    func = value.__func__ if isinstance(value, classmethod | staticmethod) else value
                    if inspect.isfunction(func):
                        seen.setdefault(f"{klass.__name__}.{attr}", func)
    return seen


def test_no_public_function_swallows_unknown_keywords():
    callables = public_callables()
    assert {"get_peft_model", "PeftModel.save_pretrained", "PeftModel.from_pretrained", "LoraConfig.from_peft_dict",
            "AdapterModel.add_weighted_adapter", "set_peft_model_state_dict"} <= set(callables)
    swallowing = sorted(name for name, f in callables.items()
                        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(f).parameters.values()))
    assert [n for n in swallowing if n not in PASSED_ON] == []


def test_unknown_keywords_are_type_errors(tiny_llama, tmp_path):
    model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    calls = [
        lambda: peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules=["q_proj"]), bogus=1),
        lambda: model.save_pretrained(tmp_path / "b", path_initial_model_for_weight_convertion="x"),
        lambda: model.add_adapter("x", peftctl.LoraConfig(target_modules=["q_proj"]), bogus=1),
        lambda: peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", bogus=1),
        lambda: model.load_adapter(tmp_path / "a", "y", bogus=1),
        lambda: model.add_weighted_adapter(["default"], [1.0], "z", bogus=1),
        lambda: peftctl.get_peft_model_state_dict(model, bogus=1),
        lambda: peftctl.LoraConfig(target_modules=["q_proj"], lora_alhpa=16),
        lambda: peftctl.LoraConfig.from_pretrained(tmp_path / "a", token="x"),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()
    with pytest.raises(TypeError, match="did you mean lora_alpha"):
        peftctl.LoraConfig(lora_alhpa=16)
    with pytest.raises(NotImplementedError, match="save_pretrained"):  # not the base model's push_to_hub
        model.push_to_hub("user/repo")


def test_auto_peft_model_hands_keywords_to_transformers(tiny_llama, tiny_model_dir, tmp_path):
    peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        peftctl.AutoPeftModelForCausalLM.from_pretrained(tmp_path, bogus=1)
    loaded = peftctl.AutoPeftModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, import_allowlist=[])
    assert loaded.get_base_model().dtype == torch.float64


# ---- PEFT's keywords ---------------------------------------------------------------------------------


def pairs():
    from peft.tuners.lora import LoraModel

    P, O = peftctl.PeftModel, peft.PeftModel  # noqa: E741, N806
    table = [(peftctl.get_peft_model, peft.get_peft_model), (P.__init__, O.__init__),
             (peftctl.get_peft_model_state_dict, peft.get_peft_model_state_dict),
             (peftctl.set_peft_model_state_dict, peft.set_peft_model_state_dict),
             (peftctl.AutoPeftModel.from_pretrained, peft.AutoPeftModel.from_pretrained),
             (peftctl.LoraConfig.from_pretrained, peft.LoraConfig.from_pretrained),
             (peftctl.LoraConfig.save_pretrained, peft.LoraConfig.save_pretrained)]
    table += [(getattr(P, n), getattr(O, n)) for n in (
        "from_pretrained", "save_pretrained", "load_adapter", "add_adapter", "set_adapter", "delete_adapter",
        "disable_adapter", "get_base_model", "print_trainable_parameters", "get_nb_trainable_parameters")]
    # PeftModel reaches these on its LoraModel; peftctl's PeftModel defines them.
    table += [(getattr(P, n), getattr(LoraModel, n)) for n in (
        "merge_adapter", "unmerge_adapter", "add_weighted_adapter", "merge_and_unload", "unload")]
    return table


# Keywords PEFT takes through **kwargs (documented, or read with kwargs.get), by function.
PEFT_KWARGS = {
    "from_pretrained": {"subfolder", "revision", "cache_dir", "token", "torch_device"},
    "load_adapter": {"subfolder", "revision", "cache_dir", "token"},
    "save_pretrained": {"state_dict"},
}


def test_every_peft_keyword_is_a_keyword_here():
    for ours, theirs in pairs():
        named = {n for n, p in inspect.signature(theirs).parameters.items()
                 if n not in ("self", "cls") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if ours.__qualname__.startswith("PeftModel."):
            named |= PEFT_KWARGS.get(ours.__name__, set())
        mine = set(inspect.signature(ours).parameters)
        assert named - mine == set(), ours.__qualname__


def test_peft_keywords_not_implemented_raise_naming_them(tiny_llama, tmp_path):
    config = peftctl.LoraConfig(target_modules=["q_proj"])
    model = peftctl.get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    for call, name in [
        (lambda: peftctl.get_peft_model(tiny_llama(), config, autocast_adapter_dtype=False), "autocast_adapter_dtype"),
        (lambda: peftctl.get_peft_model(tiny_llama(), config, mixed=True), "mixed"),
        (lambda: model.add_adapter("b", config, autocast_adapter_dtype=False), "autocast_adapter_dtype"),
        (lambda: peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path, ephemeral_gpu_offload=True),
         "ephemeral_gpu_offload"),
        (lambda: model.load_adapter(tmp_path, "c", autocast_adapter_dtype=False), "autocast_adapter_dtype"),
        (lambda: peftctl.set_peft_model_state_dict(model, {}, ignore_mismatched_sizes=True), "ignore_mismatched_sizes"),
        (lambda: peftctl.LoraConfig(layer_replication=[[0, 1]]), "layer_replication"),
        (lambda: peftctl.LoraConfig(use_qalora=True), "use_qalora"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
    # PEFT's settings that are inert while their feature is off are accepted, as PEFT writes them.
    assert peftctl.LoraConfig(loftq_config={}, qalora_group_size=16, peft_version="0.21.2", layer_replication=None).r == 8


def test_peft_keywords_that_work(tiny_llama, tmp_path):
    ids = torch.randint(0, 300, (2, 8))
    torch.manual_seed(0)
    model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules=["q_proj"], init_lora_weights=False),
                                   revision="v1", low_cpu_mem_usage=True).eval()
    assert model.peft_config["default"].revision == "v1"
    with torch.no_grad():
        want = model(input_ids=ids).logits
    # state_dict: the tensors come from it, not from the live parameters.
    sd = {k: v * 2 if "lora_B" in k else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "doubled", state_dict=sd)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(peftctl.get_peft_model_state_dict(model, state_dict=sd)[key],
                       2 * model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    model.save_pretrained(tmp_path / "plain", is_main_process=False)
    assert not (tmp_path / "plain").exists()
    model.save_pretrained(tmp_path / "plain", selected_adapters=["default"])
    # unwrap_compiled reads through torch.compile's wrapper.
    compiled = torch.compile(model)
    assert peftctl.get_peft_model_state_dict(compiled, unwrap_compiled=True).keys() == \
        peftctl.get_peft_model_state_dict(model).keys()
    # key_mapping renames saved keys (without the base_model.model. prefix) before loading.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    save_file({k.replace("self_attn", "attention"): v for k, v in tensors.items()}, renamed / "adapter_model.safetensors")
    (renamed / "adapter_config.json").write_text((tmp_path / "plain" / "adapter_config.json").read_text())
    loaded = peftctl.PeftModel.from_pretrained(tiny_llama(), renamed, key_mapping={r"\.attention\.": ".self_attn."},
                                               torch_device="cpu", low_cpu_mem_usage=True, subfolder=None)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="missing"):
        peftctl.PeftModel.from_pretrained(tiny_llama(), renamed)
    # subfolder, and a second adapter with every loading keyword.
    loaded.load_adapter(tmp_path, "again", subfolder="plain", torch_device="cpu", low_cpu_mem_usage=True,
                        key_mapping={})
    assert "again" in loaded.peft_config
    assert json.loads((tmp_path / "doubled" / "adapter_config.json").read_text())["revision"] == "v1"
    merged = loaded.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)


# ---- disable_adapter ---------------------------------------------------------------------------------


def test_nested_disable_adapter_stays_disabled_until_the_outer_block_ends(tiny_llama):
    ids = torch.randint(0, 300, (1, 6))
    model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules=["q_proj"], init_lora_weights=False,
                                                                    modules_to_save=["lm_head"])).eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
            with model.disable_adapter():
                assert torch.equal(model(input_ids=ids).logits, base)
            assert torch.equal(model(input_ids=ids).logits, base)  # still disabled after the inner block
        assert torch.equal(model(input_ids=ids).logits, with_adapter)
        # A model disabled by hand stays disabled after a block.
        model.base_model.disable_adapter_layers()
        with model.disable_adapter():
            pass
        assert torch.equal(model(input_ids=ids).logits, base)
    assert not torch.equal(base, with_adapter)


# ---- new adapter modules take the model's mode ---------------------------------------------------------


def modes(model):
    return {m.training for m in model.modules()}


@pytest.mark.parametrize("training", [False, True])
def test_every_way_of_adding_an_adapter_keeps_the_model_s_mode(training, tiny_llama, tmp_path):
    config = peftctl.LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.1, modules_to_save=["lm_head"])
    base = tiny_llama().train(training)
    model = peftctl.get_peft_model(base, config)
    assert modes(model) == {training}, "get_peft_model"
    model.save_pretrained(tmp_path)
    model.add_adapter("added", peftctl.LoraConfig(target_modules=["q_proj"], lora_dropout=0.2,
                                                  modules_to_save=["lm_head"]))
    assert modes(model) == {training}, "add_adapter"
    model.load_adapter(tmp_path, "loaded", is_trainable=True)
    assert modes(model) == {training}, "load_adapter"
    model.delete_adapter("added")
    model.delete_adapter("loaded")
    model.add_weighted_adapter(["default"], [0.5], "combined", combination_type="linear")
    assert modes(model) == {training}, "add_weighted_adapter"
    model.resize_adapter_rank("combined", 2)
    assert modes(model) == {training}, "resize_adapter_rank"
    loaded = peftctl.PeftModel.from_pretrained(tiny_llama().train(training), tmp_path, is_trainable=True)
    assert modes(loaded) == {training}, "from_pretrained"
    dropouts = [m for m in model.modules() if isinstance(m, LoraLayer)][0].lora_dropout
    assert all(isinstance(d, nn.Dropout) and d.training == training for d in dropouts.values())
