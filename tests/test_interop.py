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
from tiny_modules import tiny_gemma3, tiny_gpt2

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
    # The same tensors under the same keys (PEFT may add the embedding matrix, a base weight).
    ours_keys, theirs_keys = keys_and_shapes(tmp_path / "ours"), keys_and_shapes(tmp_path / "theirs")
    assert {k: v for k, v in theirs_keys.items() if ".base_layer.weight" not in k} == ours_keys
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


def test_options_peftctl_does_not_implement_are_refused(tiny_llama, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2]]))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer_replication=\[\[0, 2\]\]"):
        peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path)
