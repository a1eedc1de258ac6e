"""LoHa and LoKr through the CLI end to end on the tiny model: train, inspect (run and recipe, with the
memory estimate), the dry run, eval, merge, export (peft, merged, gguf), PEFT loading the exported
adapter to the same outputs; what they cannot do is exit 2 with the reason."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from clirun import run, run_json
from tiny import recipe_text

# PEFT's default targets for Llama: q_proj (64 x 64) and v_proj (32 x 64), in 2 layers, r=8.
# LoHa: 2 x (out x r + r x in) per module. LoKr: 64 = 8 x 8, 32 = 4 x 8; r=8 >= max(b, d) / 2, so
# W1 (a, c) and W2 (b, d) are full: q_proj 8*8 + 8*8, v_proj 4*8 + 8*8.
PARAMS = {"loha": 2 * (2 * (64 * 8 + 8 * 64) + 2 * (32 * 8 + 8 * 64)), "lokr": 2 * (64 + 64 + 32 + 64)}
# ΔW of every adapted module, kept for the backward (float32): the memory estimate counts it.
KEPT = 4 * 2 * (64 * 64 + 32 * 64)
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, chat_data):
    folder = tmp_path_factory.mktemp("lycoris")
    out = {}
    for method in PARAMS:
        recipe = folder / f"{method}.yaml"
        recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), method,
                                      adapter={"method": method, "rank_dropout": 0.1},
                                      train={"max_steps": 4, "lr": 2e-2}))
        out[method] = (recipe, folder / method, run_json("train", recipe))
    return out


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", PARAMS)
def test_a_run_trains_inspects_evaluates_merges_and_exports(runs, tmp_path, tiny_model_dir, method):
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    recipe, run_dir, summary = runs[method]
    assert summary["status"] == "completed" and summary["trainable_params"] == PARAMS[method]
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper() and cfg["rank_dropout"] == 0.1 and cfg["r"] == 8

    res = run_json("inspect", run_dir)
    assert res["method"] == method and res["adapter_params"] == PARAMS[method]
    assert {(m["module"].split(".")[-1], m["rank"], m["alpha"], m["scaling"]) for m in res["modules"]} == {
        ("q_proj", 8, 8, 1.0), ("v_proj", 8, 8, 1.0)}
    assert "model.layers.1.self_attn.v_proj" in run("inspect", run_dir).stdout

    plan = run_json("train", recipe, "--dry-run", "--set", "output.dir=elsewhere")
    assert plan["method"] == method and plan["trainable_params"] == PARAMS[method] and plan["adapted_modules"] == 4
    mem = run_json("inspect", recipe, "--memory")["memory"]
    assert mem["adapter_weights"] == 4 * PARAMS[method]
    # ΔW of all 4 modules without checkpointing, one layer's (2 modules) with it; the rest is equal.
    assert mem["activations_without_checkpointing"] - KEPT > 0 and mem["activations_with_checkpointing"] > KEPT // 2
    assert "r=8 alpha=8" in run("inspect", recipe).stdout

    adapted = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval())
    res = run_json("merge", run_dir, "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), adapted,
                               rtol=0, atol=1e-5)
    run_json("export", run_dir, "--format", "peft", "-o", tmp_path / "share")
    assert f"tags: [peftctl, {method}]" in (tmp_path / "share" / "README.md").read_text()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "share")
    torch.testing.assert_close(_logits(theirs.eval()), adapted, rtol=0, atol=1e-5)
    # What follows runs the same method-free code after the adapter (the merge above): one method each,
    # to keep the suite short.
    if method == "loha":
        base, tuned = run_json("eval", recipe, "--base"), run_json("eval", recipe)
        assert tuned["eval_loss"] < base["eval_loss"]
        assert tuned["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)
        return
    run_json("export", run_dir, "--format", "merged", "-o", tmp_path / "hf")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), adapted,
                               rtol=0, atol=1e-5)
    run_json("export", run_dir, "--format", "gguf", "--dtype", "float32", "-o", tmp_path / "gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(back), adapted, rtol=0, atol=1e-5)


def test_what_they_cannot_do_is_refused(runs, tmp_path, make_recipe):
    loha, lokr = runs["loha"][1], runs["lokr"][1]
    r = run("merge", lokr, lokr, "--weights", "0.5,0.5", "-o", tmp_path / "x", code=2)
    assert "LOKR adapters cannot be combined or re-weighted (PEFT's add_weighted_adapter is defined for LoRA and " \
           "IA3 only)" in r.stderr, r.stderr
    r = run("merge", loha, lokr, "-o", tmp_path / "x", code=2)
    assert "the adapters are of different methods (LOHA, LOKR)" in r.stderr
    assert not (tmp_path / "x").exists()
    r = run("validate", make_recipe(adapter={"method": "lokr", "lora_alpha": 16}), code=2)
    assert "adapter.lokr.lora_alpha" in r.stderr or "lora_alpha" in r.stderr
    r = run("validate", make_recipe(adapter={"method": "loha", "decompose_both": True}), code=2)
    assert "decompose_both" in r.stderr
