"""Prompt tuning, P-tuning and prefix tuning through the CLI on the tiny model: validate, dry run,
train, eval (loss and exact match, which generates), inspect, export --format peft (PEFT loads it
and gives the run's logits), resume (bit for bit, P-tuning's encoder included); and the refusals
(merge, packing, prefix tuning with gradient checkpointing) as exit 2 with the reason."""

from __future__ import annotations

import pytest
import torch
from clirun import run, run_json
from safetensors.torch import load_file
from tiny import recipe_text, write_chat_data

PROMPT = {"method": "prompt_tuning", "num_virtual_tokens": 6, "prompt_tuning_init": "TEXT",
          "prompt_tuning_init_text": "Convert to ISO"}
PTUNING = {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
           "encoder_hidden_size": 16}
PREFIX = {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True}


def _recipe(folder, tiny_model_dir, chat_data, name, adapter, **train):
    path = folder / f"{name}.yaml"
    held_out = write_chat_data(folder / "eval.jsonl", 4, seed=2)  # few answers to generate: a fast test
    path.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(held_out), name, adapter=adapter,
                                train={"max_steps": 2, "save_every": 1, "lr": 0.05, **train}))
    return path


def test_prompt_tuning_end_to_end(tmp_path, tiny_model_dir, chat_data):
    recipe = _recipe(tmp_path, tiny_model_dir, chat_data, "pt", PROMPT)
    run("validate", recipe)
    plan = run_json("train", recipe, "--dry-run")
    assert plan["trainable_params"] == 6 * 64 and plan["virtual_tokens"] == 6
    assert "prompt_tuning 6 virtual tokens" in run("train", recipe, "--dry-run").stdout  # not "on 0 modules"
    assert "6 virtual tokens before every sequence" in run("inspect", recipe).stdout  # not an empty table
    summary = run_json("train", recipe)
    assert summary["status"] == "completed" and summary["steps"] == 2
    out = tmp_path / "pt"
    saved = load_file(out / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (6, 64)

    result = run_json("eval", recipe)
    assert result["exact_match_n"] == 4 and 0 <= result["exact_match"] <= 1
    assert result["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)
    info = run_json("inspect", out)
    assert info["peft_type"] == "PROMPT_TUNING"

    # The exported adapter is PEFT's: PEFT loads it and gives peftctl's logits.
    run("export", out, "--format", "peft", "-o", tmp_path / "share")
    peft = pytest.importorskip("peft", reason="peft is the reference for the exported file")
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    ids = torch.tensor([[5, 17, 30, 41]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "share")
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-6)

    # Resuming from the middle checkpoint ends where the uninterrupted run ended, bit for bit.
    run("train", recipe, "--resume", out / "checkpoints" / "step-000001")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], saved["prompt_embeddings"])

    r = run("merge", out, "-o", tmp_path / "merged", code=2)
    assert "cannot be merged" in r.stderr and not (tmp_path / "merged").exists()
    r = run("train", recipe, "--dry-run", "--set", "data.packing=true", "--set", "output.dir=other", code=2)
    assert "data.packing" in r.stderr and "set data.packing: false" in r.stderr


def test_ptuning_trains_through_its_encoder_and_resumes_exactly(tmp_path, tiny_model_dir, chat_data):
    recipe = _recipe(tmp_path, tiny_model_dir, chat_data, "pt", PTUNING, gradient_checkpointing=True)
    run_json("train", recipe)
    out = tmp_path / "pt"
    saved = load_file(out / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 64)
    # A checkpoint also holds the encoder (the file holds only its output): resuming continues it.
    run("train", recipe, "--resume", out / "checkpoints" / "step-000001")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], saved["prompt_embeddings"])


def test_prefix_tuning_trains(tmp_path, tiny_model_dir, chat_data):
    recipe = _recipe(tmp_path, tiny_model_dir, chat_data, "px", PREFIX)
    assert run_json("train", recipe)["status"] == "completed"
    saved = load_file(tmp_path / "px" / "adapter_model.safetensors")
    # Llama's keys and values: 2 key-value heads of 16 = 32 wide, 2 layers, keys and values.
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    r = run("train", recipe, "--dry-run", "--set", "train.gradient_checkpointing=true", code=2)
    assert "prefix tuning" in r.stderr and "gradient_checkpointing: false" in r.stderr
