"""Adapters move both ways between peftctl and Hugging Face PEFT (a test-only dependency).

Each case builds the same adapter in both libraries from the same seed (random A and B, so the
adapter is not a no-op), perturbs peftctl's trained tensors so that loading is what makes the two
agree, saves both, loads each library's file in the other, and compares logits (fp32, atol 1e-5).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_modules import tiny_gemma3, tiny_gpt2, tiny_phi

import peftctl

peft = pytest.importorskip("peft", reason="peft is the interop reference; install the test extra")

LLAMA = {
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora-all-linear": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    "regex": {"r": 2, "lora_alpha": 3, "target_modules": r".*\.1\.mlp\.(gate|up)_proj"},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "dora-rslora-dropout": {"r": 4, "lora_alpha": 8, "use_dora": True, "use_rslora": True,
                            "lora_dropout": 0.1, "target_modules": ["k_proj", "up_proj"]},
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"],
                 "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                 "alpha_pattern": {"up_proj": 3, "layers.0.self_attn.q_proj": 16}},
    "layers": {"r": 4, "target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    "layers-no-pattern": {"r": 4, "target_modules": ["gate_proj"], "layers_to_transform": 0},
    "exclude": {"r": 2, "target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.0.self_attn.v_proj"]},
    "modules_to_save": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
    "embedding-dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["embed_tokens"]},
}
GPT2 = {
    "gpt2-conv1d": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]},
    "gpt2-dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["c_attn", "c_proj"]},
    "gpt2-bias-all": {"r": 2, "target_modules": ["c_attn"], "bias": "all"},
    "gpt2-bias-lora_only": {"r": 2, "target_modules": ["c_attn", "c_fc"], "bias": "lora_only"},
    "gpt2-lora_bias": {"r": 2, "target_modules": ["c_attn", "c_fc"], "lora_bias": True},
    "gpt2-embedding": {"r": 2, "target_modules": ["wte", "c_attn"]},
    "gpt2-score-head": {"r": 2, "target_modules": ["c_attn"], "modules_to_save": ["lm_head"]},
}
# An embedding that scales its output by a tensor (Gemma 3): the LoRA term is scaled alike.
GEMMA3 = {"gemma3-scaled-embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def keys_and_shapes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


@pytest.fixture
def build(tiny_llama):
    def make(case):
        if case.startswith("gemma3"):
            return tiny_gemma3()
        return tiny_gpt2() if case.startswith("gpt2") else tiny_llama()

    return make


@pytest.mark.parametrize("case", [*LLAMA, *GPT2, *GEMMA3])
def test_both_ways(build, tmp_path, case):
    kw = {**LLAMA, **GPT2, **GEMMA3}[case]
    ids = torch.randint(0, 300, (2, 12))
    torch.manual_seed(3)
    ours = peftctl.get_peft_model(build(case), peftctl.LoraConfig(init_lora_weights=False, **kw))
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out, embeddings and biases
        theirs = peft.get_peft_model(build(case), peft.LoraConfig(init_lora_weights=False, **kw))
    ours.eval()
    theirs.eval()
    # Same seed, same creation order: PEFT's numbers from the start.
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():  # make the two differ, so that loading is what makes them agree
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(build(case), tmp_path / "ours")
    assert torch.allclose(logits(in_peft, ids), logits(ours, ids), atol=1e-5)
    in_ours = peftctl.PeftModel.from_pretrained(build(case), tmp_path / "theirs")
    assert torch.allclose(logits(in_ours, ids), logits(theirs, ids), atol=1e-5)
    # The same tensors under the same keys (with save_embedding_layers="auto", both add the matrix
    # of an embedding targeted by name).
    assert keys_and_shapes(tmp_path / "ours") == keys_and_shapes(tmp_path / "theirs")
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "bias", "lora_bias", "fan_in_fan_out",
                  "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "inference_mode"):
        assert cfgs[0][field] == cfgs[1][field], field


def test_merged_models_agree_with_peft(tiny_llama):
    """merge_and_unload gives PEFT's merged weights (DoRA and plain LoRA on one model)."""
    torch.manual_seed(0)
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    ours = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(**kw))
    ours.add_adapter("d", peftctl.LoraConfig(use_dora=True, **kw))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    theirs.add_adapter("d", peft.LoraConfig(use_dora=True, **kw))
    ours_m = ours.merge_and_unload(adapter_names=["default", "d"]).state_dict()
    theirs_m = theirs.merge_and_unload(adapter_names=["default", "d"]).state_dict()
    assert ours_m.keys() == theirs_m.keys()
    for k in ours_m:
        assert torch.allclose(ours_m[k], theirs_m[k], atol=1e-5), k


def test_non_default_name_uses_peft_subfolder_layout(tiny_llama, tmp_path):
    kw = {"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False}
    ours = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(**kw), adapter_name="other")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw), adapter_name="other")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    files = [sorted(p.relative_to(tmp_path / w).as_posix() for p in (tmp_path / w).rglob("adapter_*"))
             for w in ("ours", "theirs")]
    assert files[0] == files[1] == ["other/adapter_config.json", "other/adapter_model.safetensors"]
    ids = torch.randint(0, 300, (1, 8))
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours" / "other", adapter_name="other")
    assert torch.allclose(logits(in_peft, ids), logits(ours, ids), atol=1e-5)
    in_ours = peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs", subfolder="other",
                                                adapter_name="other")
    assert torch.allclose(logits(in_ours, ids), logits(theirs, ids), atol=1e-5)
    config = peftctl.LoraConfig.from_pretrained(tmp_path / "theirs", subfolder="other")
    assert config.r == peft.LoraConfig.from_pretrained(tmp_path / "theirs", subfolder="other").r == 2


def test_options_peftctl_does_not_implement_are_refused(tiny_llama, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2]]))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer_replication=\[\[0, 2\]\]"):
        peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ---- task types that train the model's head in full (PEFT's PeftModelForSequenceClassification etc.) ----


def _classifier(kind):
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
    )

    torch.manual_seed(0)
    if kind.startswith("llama"):
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, num_labels=3, pad_token_id=0)
        return {"llama-seq": LlamaForSequenceClassification, "llama-token": LlamaForTokenClassification}[kind](config)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, num_labels=2 if kind == "bert-qa" else 3)
    return {"bert-seq": BertForSequenceClassification, "bert-token": BertForTokenClassification,
            "bert-qa": BertForQuestionAnswering}[kind](config)


def _task_outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else torch.cat([out.start_logits, out.end_logits])


@pytest.mark.parametrize(("kind", "task", "head"), [
    ("llama-seq", "SEQ_CLS", "score"), ("bert-seq", "SEQ_CLS", "classifier"), ("llama-token", "TOKEN_CLS", "score"),
    ("bert-token", "TOKEN_CLS", "classifier"), ("bert-qa", "QUESTION_ANS", "qa_outputs")])
def test_task_heads_are_trained_and_saved_as_in_peft(kind, task, head, tmp_path):
    """PEFT adds `classifier` and `score` (QA: `qa_outputs`) to modules_to_save for these tasks; so
    does peftctl, so that each library loads the other's adapter with identical outputs."""
    ids = torch.randint(1, 100, (2, 7))
    kw = {"task_type": task, "r": 4, "lora_alpha": 8, "init_lora_weights": False}
    torch.manual_seed(3)
    ours = peftctl.get_peft_model(_classifier(kind), peftctl.LoraConfig(**kw)).eval()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_classifier(kind), peft.LoraConfig(**kw)).eval()
    assert type(ours.base_model.model.get_submodule(head)).__name__ == "ModulesToSaveWrapper"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():  # a trained head and adapter on each side, different on each
        for model in (ours, theirs):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert f"base_model.model.{head}.weight" in keys_and_shapes(tmp_path / "ours")
    assert keys_and_shapes(tmp_path / "ours") == keys_and_shapes(tmp_path / "theirs")
    saved = [json.loads((tmp_path / w / "adapter_config.json").read_text())["modules_to_save"] for w in ("ours", "theirs")]
    assert saved[0] == saved[1]
    in_peft = peft.PeftModel.from_pretrained(_classifier(kind), tmp_path / "ours").eval()
    assert torch.allclose(_task_outputs(in_peft, ids), _task_outputs(ours, ids), atol=1e-5)
    in_ours = peftctl.PeftModel.from_pretrained(_classifier(kind), tmp_path / "theirs")
    assert torch.allclose(_task_outputs(in_ours, ids), _task_outputs(theirs, ids), atol=1e-5)
    # The head trained is the adapter's own copy: disabling the adapter gives the base model's head.
    with ours.disable_adapter():
        assert torch.equal(_task_outputs(ours, ids), _task_outputs(_classifier(kind).eval(), ids))


def test_a_task_head_the_model_lacks_is_skipped_with_a_warning(tiny_llama):
    with pytest.warns(UserWarning, match="task_type SEQ_CLS trains the model's head in full.*classifier or score"):
        model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]  # recorded as PEFT records it


# ---- PiSSA / OLoRA saved as plain LoRA for the original base ----------------------------------------


@pytest.mark.parametrize("kw", [
    {"init_lora_weights": "pissa"},
    {"init_lora_weights": "olora"},
    {"init_lora_weights": "pissa_niter_4", "modules_to_save": ["lm_head"]},
    # PEFT refuses rsLoRA with patterns here; peftctl keeps each module's scaling (alpha * sqrt(2)).
    {"init_lora_weights": "pissa", "use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_pissa_converted_on_save_loads_on_the_original_base(kw, tiny_llama, tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) writes a rank-2r LoRA whose outputs
    on the original base equal the PiSSA / OLoRA model's (both are float32 sums of the same terms in
    another order: about 1e-6 apart on logits of size ~1), in PEFT and in peftctl."""
    ids = torch.randint(0, 300, (2, 10))
    model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                    **kw))
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # "training"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    assert saved["rank_pattern"] == {k: 2 * v for k, v in kw.get("rank_pattern", {}).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    in_ours = peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    for loaded in (in_peft, in_ours):
        assert (logits(loaded, ids) - want).abs().max() < 1e-5
    with in_ours.disable_adapter():  # an ordinary LoRA: off, it is the original base model
        assert torch.equal(logits(in_ours, ids), logits(tiny_llama(), ids))
    # The same conversion as PEFT's: PEFT, converting from the same tensors, writes the same ones.
    if not kw.get("use_rslora") and "modules_to_save" not in kw:
        torch.manual_seed(0)
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   **kw))
        theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter loads as it is
        theirs.save_pretrained(tmp_path / "theirs-init")
        peft.set_peft_model_state_dict(theirs, peftctl.get_peft_model_state_dict(model))
        theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs-init"))
        with safe_open(str(tmp_path / "theirs" / "adapter_model.safetensors"), "pt") as f, \
                safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as g:
            assert set(f.keys()) == set(g.keys())
            for k in f.keys():
                assert torch.allclose(f.get_tensor(k), g.get_tensor(k), atol=1e-6), k


def test_conversion_refuses_what_it_cannot_convert(tiny_llama, tmp_path):
    model = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    other = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"other: .*lora_A.weight has shape \(2, 64\) there and \(4, 64\) here"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    dora = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa", use_dora=True))
    with pytest.raises(ValueError, match="DoRA adapter cannot be converted"):
        dora.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_with_several_adapters_save_peft_keys_and_load_back(tmp_path, bias):
    """One adapter trains the base biases, another adapter wraps other layers: each folder holds the
    keys PEFT writes for the same model (the first also the base biases of layers the second
    wrapped, which it trained), and each library loads both folders back to the same outputs."""
    kw = {"r": 2, "target_modules": ["c_attn"], "bias": bias, "init_lora_weights": False,
          **({"modules_to_save": ["ln_f"]} if bias == "all" else {})}
    other = {"r": 2, "target_modules": ["c_fc"], "init_lora_weights": False}
    ids = torch.randint(0, 300, (2, 12))
    models = {}
    for lib in (peftctl, peft):
        torch.manual_seed(3)
        m = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(**kw))
        m.add_adapter("other", lib.LoraConfig(**other))
        torch.manual_seed(4)
        for name in ("default", "other"):  # "train" each adapter: move whatever it trains
            m.set_adapter(name)
            with torch.no_grad():
                for p in m.parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn_like(p))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.save_pretrained(tmp_path / lib.__name__)
        models[lib.__name__] = m
    for sub in ("", "other"):
        ours, theirs = keys_and_shapes(tmp_path / "peftctl" / sub), keys_and_shapes(tmp_path / "peft" / sub)
        # PEFT's bias='all' also saves the modules_to_save wrapper's internals: the original
        # module's bias, and the copy's bias a second time under "modules_to_save.bias".
        wrapper_internals = {k for k in theirs if ".original_module." in k or ".modules_to_save." in k}
        assert ours == {k: v for k, v in theirs.items() if k not in wrapper_internals}
    assert "base_model.model.transformer.h.0.mlp.c_fc.base_layer.bias" in keys_and_shapes(tmp_path / "peftctl")
    for lib in ("peftctl", "peft"):  # each library's files, loaded back by peftctl
        loaded = peftctl.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / lib)
        loaded.load_adapter(tmp_path / lib / "other", adapter_name="other")
        for name in ("default", "other"):
            models[lib].set_adapter(name)
            loaded.set_adapter(name)
            assert torch.allclose(logits(loaded, ids), logits(models[lib].eval(), ids), atol=1e-5), (lib, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peftctl" / "other", adapter_name="other")
        in_peft.load_adapter(tmp_path / "peftctl", adapter_name="default")
    in_peft.set_adapter("default")
    models["peftctl"].set_adapter("default")
    # (PEFT needs "other" first: it drops the c_fc bias of a folder loaded into a model without c_fc wrapped.)
    assert torch.allclose(logits(in_peft, ids), logits(models["peftctl"], ids), atol=1e-5)
    with pytest.raises(ValueError, match="only one adapter may"):  # PEFT's rule too
        models["peftctl"].add_adapter("third", peftctl.LoraConfig(r=2, target_modules=["c_proj"], bias="all"))


@pytest.mark.parametrize("save_embedding_layers", [True, "auto"])
def test_an_adapted_head_is_saved_with_its_bias(tmp_path, save_embedding_layers):
    """Phi's lm_head has a bias: saving the embedding layers writes it with the weight, under PEFT's
    keys, and both libraries load it back."""
    kw = {"r": 2, "target_modules": ["q_proj", "lm_head"], "init_lora_weights": False}
    ids = torch.randint(0, 320, (2, 12))
    ours = peftctl.get_peft_model(tiny_phi(), peftctl.LoraConfig(**kw))
    with torch.no_grad():  # the head changed (as when new tokens got their rows)
        head = ours.base_model.model.lm_head.base_layer
        head.bias.add_(torch.randn_like(head.bias))
        head.weight.add_(0.1 * torch.randn_like(head.weight))
    with pytest.warns(UserWarning, match="target_modules") if save_embedding_layers == "auto" else warnings.catch_warnings():
        ours.save_pretrained(tmp_path / "ours", save_embedding_layers=save_embedding_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_phi(), peft.LoraConfig(**kw)).save_pretrained(
            tmp_path / "theirs", save_embedding_layers=save_embedding_layers)
        in_peft = peft.PeftModel.from_pretrained(tiny_phi(), tmp_path / "ours")
    keys = keys_and_shapes(tmp_path / "ours")
    assert keys == keys_and_shapes(tmp_path / "theirs")
    assert keys["base_model.model.lm_head.base_layer.bias"] == (320,)
    in_ours = peftctl.PeftModel.from_pretrained(tiny_phi(), tmp_path / "ours")
    for loaded in (in_ours, in_peft):
        assert torch.allclose(logits(loaded, ids), logits(ours.eval(), ids), atol=1e-5)


@pytest.mark.parametrize("save_embedding_layers", ["default", "auto", False])
def test_resized_embeddings_are_saved_with_the_adapter(tiny_model_dir, tmp_path, save_embedding_layers):
    """Two new tokens: resize the embeddings, set the new rows, train LoRA, save. By default ("auto",
    as in PEFT) the resized matrices go into the file, with a warning, and the adapter loaded on a
    freshly resized base gives the trained model's outputs; False leaves them out."""
    from transformers import AutoModelForCausalLM

    def resized_base():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.resize_token_embeddings(322)
        return model

    torch.manual_seed(0)
    base = resized_base()
    with torch.no_grad():
        base.get_input_embeddings().weight[320:] = torch.randn(2, 64)
        base.get_output_embeddings().weight[320:] = torch.randn(2, 64)
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    ours = peftctl.get_peft_model(base, peftctl.LoraConfig(**kw))
    option = {} if save_embedding_layers == "default" else {"save_embedding_layers": save_embedding_layers}
    if save_embedding_layers is False:
        ours.save_pretrained(tmp_path / "ours", **option)
    else:
        with pytest.warns(UserWarning, match="the vocabulary has 322 tokens and the base model's 320"):
            ours.save_pretrained(tmp_path / "ours", **option)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(resized_base(), peft.LoraConfig(**kw))
        theirs.save_pretrained(tmp_path / "theirs", **option)
    keys = keys_and_shapes(tmp_path / "ours")
    assert keys == keys_and_shapes(tmp_path / "theirs")
    embeddings = {k: v for k, v in keys.items() if "lora_" not in k}
    ids = torch.tensor([[5, 320, 17, 321, 42, 321]])
    loaded = peftctl.PeftModel.from_pretrained(resized_base(), tmp_path / "ours")
    off = (logits(loaded, ids) - logits(ours.eval(), ids)).abs().max()
    if save_embedding_layers is False:
        assert embeddings == {} and off > 1e-2  # the new rows are lost
        return
    assert embeddings == {"base_model.model.model.embed_tokens.weight": (322, 64),
                          "base_model.model.lm_head.weight": (322, 64)}
    assert off < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(resized_base(), tmp_path / "ours")
    assert torch.allclose(logits(in_peft, ids), logits(ours, ids), atol=1e-5)
