"""Which modules an adapter config selects, against PEFT (a test-only oracle): every case of the
table selects the same adapted modules and the same modules_to_save in both libraries; the default
targets per model type are PEFT's; rank / alpha pattern keys resolve by specificity, not by order,
and keys that match nothing are errors naming them."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from tiny_modules import make, tiny_gpt2

import peftctl
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.matching import DEFAULT_TARGETS, pattern_key
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper

peft = pytest.importorskip("peft", reason="peft is the matching reference; install the test extra")


def llama(layers=2, seq_cls=False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False, num_labels=3,
                         pad_token_id=0)
    return (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(config)


def bert_seq_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=100, num_labels=3))


def _all_21_llama3():
    return [f"model.layers.{i}.{m}" for i in range(3) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


# (model builder, LoraConfig keywords). Each is a rule of PEFT's that an adapter file relies on.
CASES = {
    "full-path-head-ignores-layer-filter": (llama, {"target_modules": ["lm_head", "q_proj"], "layers_to_transform": [0]}),
    "full-path-inner-ignores-layer-filter": (llama, {"target_modules": ["model.layers.1.self_attn.q_proj", "v_proj"],
                                                     "layers_to_transform": [0]}),
    "dotted-suffix-with-layers": (llama, {"target_modules": ["self_attn.q_proj"], "layers_to_transform": [1]}),
    "layers-pattern": (llama, {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}),
    "layers-pattern-list": (llama, {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["h", "layers"]}),
    "layers-empty-list": (llama, {"target_modules": ["q_proj"], "layers_to_transform": []}),
    "regex-full-match": (llama, {"target_modules": r".*\.0\..*proj"}),
    "all-linear": (llama, {"target_modules": "all-linear"}),
    "exclude-list": (llama, {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.0.self_attn.q_proj"]}),
    "exclude-regex": (llama, {"target_modules": "all-linear", "exclude_modules": r".*\.1\..*"}),
    "exclude-full-path": (llama, {"target_modules": ["q_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]}),
    "modules-to-save-not-targeted": (llama, {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]}),
    "modules-to-save-plain-suffix": (llama, {"target_modules": ["q_proj"], "modules_to_save": ["norm"]}),
    # 20 entries or more: PEFT condenses the list to suffixes, which the layer filter then sees.
    "condensed-full-paths-with-layers": (lambda: llama(3), {"target_modules": _all_21_llama3(), "layers_to_transform": [0]}),
    "condensed-mixed": (lambda: llama(3), {"target_modules": [*_all_21_llama3()[1:], "lm_head"], "layers_to_transform": [2]}),
    "gpt2-conv1d-layers": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1]}),
    "gpt2-all-linear": (tiny_gpt2, {"target_modules": "all-linear"}),
    "seq-cls-all-linear-no-task": (lambda: llama(seq_cls=True), {"target_modules": "all-linear"}),
    "seq-cls-all-linear-task": (lambda: llama(seq_cls=True), {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    "bert-seq-cls-default-targets": (bert_seq_cls, {"task_type": "SEQ_CLS"}),
    "bert-seq-cls-modules-to-save": (bert_seq_cls, {"task_type": "SEQ_CLS", "modules_to_save": ["pooler.dense"]}),
    "plain-module-all-linear-keeps-lm-head": (lambda: make("mlp"), {"target_modules": "all-linear"}),
}


def selected(model, wrapper_types):
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, wrapper_types[0]))
    saved = sorted(n for n, m in model.named_modules() if isinstance(m, wrapper_types[1]))
    return adapted, saved


@pytest.mark.parametrize("case", CASES)
def test_an_adapter_config_selects_the_same_modules_as_in_peft(case, tmp_path):
    build, kw = CASES[case]
    ours = peftctl.get_peft_model(build(), peftctl.LoraConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**kw))
    want = selected(theirs.base_model.model, (peft.tuners.lora.LoraLayer, peft.utils.other.ModulesToSaveWrapper))
    got = selected(ours.base_model.model, (AdapterLayer, ModulesToSaveWrapper))
    assert got == want
    # The file peftctl writes selects the same modules again, here and in PEFT.
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(build(), tmp_path)
    assert selected(in_peft.base_model.model, (peft.tuners.lora.LoraLayer, peft.utils.other.ModulesToSaveWrapper)) == want
    assert selected(peftctl.PeftModel.from_pretrained(build(), tmp_path).base_model.model,
                    (AdapterLayer, ModulesToSaveWrapper)) == want


def test_all_linear_with_layers_is_peftctls_extension(tiny_llama):
    """PEFT refuses layers_to_transform with all-linear; peftctl applies the filter, and the file it
    writes (the explicit module list) selects those modules in PEFT too."""
    ours = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules="all-linear", layers_to_transform=[0]))
    adapted, _ = selected(ours.base_model.model, (AdapterLayer, ModulesToSaveWrapper))
    assert len(adapted) == 7 and all(".layers.0." in n for n in adapted)


def test_default_targets_are_peft_s_table():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    assert DEFAULT_TARGETS == PEFT_DEFAULTS


def test_phi_default_targets_include_the_mlp():
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)

    def build():
        torch.manual_seed(0)
        return PhiForCausalLM(config)

    ours = peftctl.get_peft_model(build(), peftctl.LoraConfig())
    theirs = peft.get_peft_model(build(), peft.LoraConfig())
    want = selected(theirs.base_model.model, (peft.tuners.lora.LoraLayer, peft.utils.other.ModulesToSaveWrapper))
    assert selected(ours.base_model.model, (AdapterLayer, ModulesToSaveWrapper)) == want
    assert sorted(n.rsplit(".", 1)[1] for n in want[0]) == ["fc1", "fc2", "q_proj", "v_proj"]
    assert sorted(ours.peft_config["default"].target_modules) == ["fc1", "fc2", "q_proj", "v_proj"]


# ---- rank_pattern / alpha_pattern --------------------------------------------------------------


def scalings(model):
    return {n.removeprefix("model.layers."): (m.r["default"], m.scaling["default"])
            for n, m in model.base_model.model.named_modules() if isinstance(m, AdapterLayer)}


@pytest.mark.parametrize("order", ["general-first", "specific-first"])
def test_overlapping_pattern_keys_resolve_by_specificity_in_any_order(order, tiny_llama, tmp_path):
    """The issue's case: {q_proj: 16, model.layers.0.self_attn.q_proj: 256} with r=8 gave layer 0 a
    scaling of 2.0 when created and 32.0 when reloaded (first key in insertion, then sorted order)."""
    keys = {"q_proj": 16, "model.layers.0.self_attn.q_proj": 256}
    alpha = keys if order == "general-first" else dict(reversed(keys.items()))
    model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(r=8, target_modules=["q_proj"], alpha_pattern=alpha))
    want = {"0.self_attn.q_proj": (8, 32.0), "1.self_attn.q_proj": (8, 2.0)}
    assert scalings(model) == want
    model.save_pretrained(tmp_path)
    assert scalings(peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path)) == want
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert {n.removeprefix("model.layers."): (m.r["default"], m.scaling["default"])
            for n, m in loaded.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)} == want


def test_specificity_rule():
    name = "model.layers.0.self_attn.q_proj"
    assert pattern_key({"q_proj": 1, "self_attn.q_proj": 2}, name) == "self_attn.q_proj"  # more of the path
    assert pattern_key({"layers.0.self_attn.q_proj": 1, name: 2}, name) == name  # the full path beats all
    assert pattern_key({r"^model\.layers\.0\..*": 1, "self_attn.q_proj": 2}, name) == r"^model\.layers\.0\..*"
    assert pattern_key({".*_proj": 1, "q_proj": 2}, name) == "q_proj"  # same length: a plain name beats a regex
    assert pattern_key({"q_proj": 1, "k_proj": 2}, name) == "q_proj"
    assert pattern_key({"^q_proj": 1}, name) is None  # `^` anchors at the path's start, as in PEFT
    assert pattern_key({"proj": 1}, name) is None  # keys match whole parts of the path
    assert pattern_key({"(q|k)_proj": 1, ".*q_proj": 1}, name) in ("(q|k)_proj", ".*q_proj")  # tie, same value
    with pytest.raises(ValueError, match=r"'\(q\|k\)_proj' and '\.\*q_proj' both match module .* equally"):
        pattern_key({"(q|k)_proj": 1, ".*q_proj": 2}, name, "rank_pattern")


def test_ambiguous_keys_are_refused_when_created(tiny_llama):
    with pytest.raises(ValueError, match="rank_pattern keys '.*' and '.*' both match module model.layers.0"):
        peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(target_modules=["q_proj"],
                                                                  rank_pattern={"(q|v)_proj": 4, "q_.*": 2}))


def test_patterns_are_written_so_that_peft_resolves_them_the_same(tiny_llama, tmp_path):
    """`.*proj` sorts before `layers.0.self_attn.q_proj`: PEFT, taking the first key in the file,
    would give layer 0 rank 2. peftctl writes one anchored key per module instead."""
    ids = torch.randint(0, 300, (2, 9))
    config = peftctl.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                rank_pattern={"layers.0.self_attn.q_proj": 6, ".*proj": 2},
                                alpha_pattern={"self_attn.v_proj": 3, "v_proj": 5})
    ours = peftctl.get_peft_model(tiny_llama(), config).eval()
    assert {k: v[0] for k, v in scalings(ours).items()} == {
        "0.self_attn.q_proj": 6, "0.self_attn.v_proj": 2, "1.self_attn.q_proj": 2, "1.self_attn.v_proj": 2}
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {
        r"^model\.layers\.0\.self_attn\.q_proj": 6, r"^model\.layers\.0\.self_attn\.v_proj": 2,
        r"^model\.layers\.1\.self_attn\.q_proj": 2, r"^model\.layers\.1\.self_attn\.v_proj": 2}
    assert saved["alpha_pattern"] == {"self_attn.v_proj": 3, "v_proj": 5}  # PEFT's order already agrees
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(in_peft(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


def test_a_file_whose_patterns_peft_reads_otherwise_is_refused(tiny_llama, tmp_path):
    """A PEFT file where the first key in file order is not the most specific: which one it was
    trained with cannot be known."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
            target_modules=["q_proj"], alpha_pattern={"q_proj": 4, "self_attn.q_proj": 16}))
        theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="alpha_pattern keys 'q_proj' and 'self_attn.q_proj' both match module "
                                         "model.layers.0.self_attn.q_proj.*PEFT applies the first"):
        peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_misspelt_pattern_keys_are_errors_naming_the_key(field, tiny_llama):
    # Against a list of target names, a plain key is checked with the config, before any model loads.
    with pytest.raises(ValueError, match=rf"{field} key 'q_porj' matches no module that target_modules selects "
                                         r"\(q_proj, v_proj\); did you mean q_proj"):
        peftctl.LoraConfig(target_modules=["q_proj", "v_proj"], **{field: {"q_porj": 16}})
    with pytest.raises(ValueError, match=rf"{field} key 'k_proj' matches no module"):  # exists, but not adapted
        peftctl.LoraConfig(target_modules=["q_proj"], **{field: {"k_proj": 2}})
    # Otherwise against the adapted modules, when the adapter is created.
    for kw, key in [({"target_modules": None}, "q_porj"), ({"target_modules": r".*\.self_attn\.(q|v)_proj"}, "q_porj"),
                    ({"target_modules": ["q_proj"], "layers_to_transform": [0]}, "layers.1.self_attn.q_proj"),
                    ({"target_modules": ["q_proj"]}, "(k|o)_proj"), ({"target_modules": ["q_proj"]}, "mlp.*")]:
        config = peftctl.LoraConfig(**kw, **{field: {key: 16}})
        with pytest.raises(ValueError, match=rf"{field} key\(s\) '{re.escape(key)}' match no module this adapter "
                                             r"adapts(; did you mean: q_proj.*)? \(adapted: q_proj"):
            peftctl.get_peft_model(tiny_llama(), config)


def test_a_saved_adapter_with_an_unused_pattern_key_loads_with_a_warning(tiny_llama, tmp_path):
    """PEFT only warns about such keys, so its files may hold them; the weights are what they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], rank_pattern={"q_porj": 16})
                            ).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="rank_pattern key.*'q_porj'.*ignored"):
        peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path)
