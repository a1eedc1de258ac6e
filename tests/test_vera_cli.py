"""VeRA through the CLI end to end on the tiny model: train (and its dry run), inspect (recipe and
run), eval, merge, export (peft, merged, gguf), PEFT loading the export; what VeRA cannot do is exit
2 with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run, run_json
from tiny import recipe_text

R = 16
# q_proj (64 outputs) and v_proj (32) in 2 layers, PEFT's Llama default: r + out numbers each.
TRAINABLE = 2 * ((R + 64) + (R + 32))
# The shared projections A (r x 64) and B (64 x r): frozen, saved with the adapter.
PROJECTIONS = R * 64 + 64 * R
VERA = {"method": "vera", "r": R}
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vera_run(tmp_path_factory, tiny_model_dir, chat_data):
    folder = tmp_path_factory.mktemp("vera")
    recipe = folder / "vera.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), "run", adapter=VERA,
                                  train={"max_steps": 6, "lr": 0.05, "save_every": 3}))
    return recipe, folder / "run", run_json("train", recipe)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_run_trains_saves_describes_itself_and_evaluates(vera_run):
    recipe, run_dir, summary = vera_run
    assert summary["status"] == "completed" and summary["trainable_params"] == TRAINABLE
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["r"] == R and cfg["save_projection"] is True
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"} and "exclude_modules" not in cfg
    assert (run_dir / "checkpoints" / "step-000006" / "adapter_model.safetensors").exists()

    res = run_json("inspect", run_dir)
    assert res["method"] == "vera" and res["adapter_params"] == TRAINABLE + PROJECTIONS
    assert res["other_tensors"] == {"base_model.vera_A": [R, 64], "base_model.vera_B": [64, R]}
    assert [(m["module"].split(".")[-1], m["r"], m["out_features"], m["params"]) for m in res["modules"]][:2] == [
        ("q_proj", R, 64, R + 64), ("v_proj", R, 32, R + 32)]
    text = run("inspect", run_dir).stdout
    assert "base_model.vera_A 16x64" in text and "projection_prng_key=0" in text

    base = run_json("eval", recipe, "--base")
    tuned = run_json("eval", recipe)
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)


def test_inspect_a_recipe_and_its_dry_run(vera_run):
    recipe, _, _ = vera_run
    res = run_json("inspect", recipe, "--memory")
    assert res["method"] == "vera" and res["trainable_params"] == TRAINABLE
    assert {m["adapter"]["default"] for m in res["modules"]} == {f"r={R}"}
    plan = run_json("train", recipe, "--dry-run", "--set", "output.dir=elsewhere")
    assert plan["method"] == "vera" and plan["trainable_params"] == TRAINABLE and plan["adapted_modules"] == 4
    mem = plan["memory_estimate_bytes"]
    # float32 vectors, their gradients, AdamW's two moments; the frozen projections count as weights.
    assert (mem["adapter_weights"], mem["gradients"], mem["optimizer_states"]) == (
        4 * TRAINABLE, 4 * TRAINABLE, 8 * TRAINABLE)
    assert mem["weights"]["float32"] == 4 * (plan["total_params"] - TRAINABLE) + 4 * PROJECTIONS


def test_merge_and_every_export_give_the_adapter_models_outputs(vera_run, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    import warnings

    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    _, run_dir, _ = vera_run
    adapted = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval())
    # merged W + (b B)(d A) against the unmerged sum: float32 rounding of sums of 64 terms (see test_vera)
    res = run_json("merge", run_dir, "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4 and res["combination_type"] is None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)

    run_json("export", run_dir, "--format", "peft", "-o", tmp_path / "share")
    assert "tags: [peftctl, vera]" in (tmp_path / "share" / "README.md").read_text()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "share")
    torch.testing.assert_close(_logits(theirs.eval()), adapted, rtol=0, atol=1e-5)

    assert run_json("export", run_dir, "--format", "merged", "-o", tmp_path / "hf")["format"] == "merged"
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), adapted,
                               rtol=0, atol=1e-5)
    run_json("export", run_dir, "--format", "gguf", "--dtype", "float32", "-o", tmp_path / "gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(back), _logits(merged), rtol=0, atol=1e-5)


def test_what_vera_cannot_do_is_refused(vera_run, tmp_path, make_recipe):
    _, run_dir, _ = vera_run
    r = run("merge", run_dir, run_dir, "-o", tmp_path / "x", code=2)
    assert "VERA adapters cannot be combined" in r.stderr and not (tmp_path / "x").exists()
    r = run("validate", make_recipe(adapter={"method": "vera", "lora_alpha": 8}), code=2)
    assert "adapter.lora_alpha" in r.stderr
    r = run("validate", make_recipe(adapter={"method": "vera", "vera_dropout": 1.5}), code=2)
    assert "adapter.vera_dropout" in r.stderr
    r = run("validate", make_recipe(adapter=VERA, train={"loraplus_lr_ratio": 16}), code=2)
    assert "a vera adapter has none" in r.stderr


def test_vera_on_a_4bit_base_trains_and_merges_in_full_precision(make_recipe, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes quantizes the base")
    recipe = make_recipe(adapter=VERA, model={"quantization": {"bits": 4}}, train={"max_steps": 2, "lr": 5e-2})
    summary = run_json("train", recipe)
    assert summary["status"] == "completed" and summary["trainable_params"] == TRAINABLE
    res = run_json("merge", tmp_path / "run", "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4 and 0 < res["vs_quantized_training_model"]["top1_agreement"] <= 1
