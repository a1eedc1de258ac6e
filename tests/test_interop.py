"""Adapters move both ways between peftctl and Hugging Face PEFT (a test-only dependency)."""

from __future__ import annotations

import json

import pytest
import torch

import peftctl

peft = pytest.importorskip("peft", reason="peft is the interop reference; install the test extra")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kw", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    {"r": 2, "lora_alpha": 3, "target_modules": r".*\.1\.mlp\.(gate|up)_proj"},
], ids=["qv", "rslora-all-linear", "regex"])
def test_both_ways(tiny_llama, tmp_path, kw):
    ids = torch.randint(0, 300, (2, 12))
    torch.manual_seed(3)
    ours = peftctl.get_peft_model(tiny_llama(), peftctl.LoraConfig(init_lora_weights=False, **kw))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **kw))
    # Same seed, same init order: PEFT's numbers from the start (up to where the scaling is applied).
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-6)
    with torch.no_grad():  # make the two differ, so loading is what makes them agree
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(logits(in_peft, ids), logits(ours, ids), atol=1e-5)
    in_ours = peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    assert torch.allclose(logits(in_ours, ids), logits(theirs, ids), atol=1e-5)
    # The same keys and config fields as PEFT writes.
    from safetensors import safe_open

    keys = [set(safe_open(str(tmp_path / w / "adapter_model.safetensors"), "pt").keys()) for w in ("ours", "theirs")]
    assert keys[0] == keys[1]
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "inference_mode"):
        assert cfgs[0][field] == cfgs[1][field], field
    as_set = [set(c["target_modules"]) if isinstance(c["target_modules"], list) else c["target_modules"] for c in cfgs]
    assert as_set[0] == as_set[1]


def test_unsupported_peft_options_are_refused(tiny_llama, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if cfg.get("use_dora") is not True:
        pytest.skip("this PEFT version did not record use_dora")
    try:
        peftctl.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    except ValueError as e:
        assert "use_dora" in str(e)
    else:  # once DoRA is implemented, loading must give PEFT's outputs instead
        pass
