"""(IA)³ through the CLI end to end on the tiny model: validate, inspect (recipe and run), train
(and its dry run), eval, merge (one run, a weighted combination), export (peft, merged, gguf), and
a 4-bit base; what IA3 cannot do is exit 2 with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run, run_json
from tiny import recipe_text

# k_proj, v_proj (output: 32 each) and down_proj (input: 128) in 2 layers: PEFT's Llama default.
DEFAULT_PARAMS = 2 * (32 + 32 + 128)
IA3 = {"method": "ia3"}
SECOND = {"method": "ia3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, chat_data):
    """Two short IA3 runs on the same base (PEFT's default targets; q_proj and down_proj), one LoRA run."""
    folder = tmp_path_factory.mktemp("ia3")
    out = {}
    for name, adapter in {"a": IA3, "b": SECOND, "lora": {"r": 2}}.items():
        recipe = folder / f"{name}.yaml"
        train = {"max_steps": 6, "lr": 0.2, "save_every": 3} if name != "lora" else {"max_steps": 2}
        recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), name,
                                      adapter=adapter, train=train))
        out[name] = (recipe, folder / name, run_json("train", recipe))
    return out


def _peft_model(base_dir, run_dir):
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def test_a_run_trains_saves_and_describes_itself(runs):
    recipe, run_dir, summary = runs["a"]
    assert summary["status"] == "completed" and summary["trainable_params"] == DEFAULT_PARAMS
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert set(cfg["target_modules"]) == {"k_proj", "v_proj", "down_proj"}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_terms" in x for x in lines)  # IA3 adds no loss term
    ckpt = run_dir / "checkpoints" / "step-000006"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "adapter_hooks.pt").exists()

    res = run_json("inspect", run_dir)
    assert res["method"] == "ia3" and res["adapter_params"] == DEFAULT_PARAMS and res["other_tensors"] == {}
    assert res["config"]["feedforward_modules"] == ["down_proj"] and "r" not in res["config"]
    assert [(m["module"].split(".")[-1], m["scales"], m["features"], m["params"]) for m in res["modules"]][:3] == [
        ("down_proj", "input", 128, 128), ("k_proj", "output", 32, 32), ("v_proj", "output", 32, 32)]
    assert res["run"]["steps"] == 6
    text = run("inspect", run_dir).stdout
    assert "model.layers.1.mlp.down_proj" in text and "input" in text and "init_ia3_weights=True" in text

    base = run_json("eval", recipe, "--base")
    tuned = run_json("eval", recipe)
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)


def test_inspect_a_recipe_and_its_dry_run(runs):
    recipe, _, _ = runs["b"]
    res = run_json("inspect", recipe, "--memory")
    assert res["method"] == "ia3" and res["trainable_params"] == 2 * (64 + 128)
    sides = {m["module"].split(".")[-1]: m["adapter"]["default"] for m in res["modules"]}
    assert sides == {"q_proj": "scales output", "down_proj": "scales input"}
    mem = res["memory"]
    # float32 vectors, their gradients, AdamW's two moments
    assert (mem["adapter_weights"], mem["gradients"], mem["optimizer_states"]) == (4 * 384, 4 * 384, 8 * 384)
    assert "scales input" in run("inspect", recipe).stdout
    plan = run_json("train", recipe, "--dry-run", "--set", "output.dir=elsewhere")
    assert plan["method"] == "ia3" and plan["trainable_params"] == 384 and plan["adapted_modules"] == 4
    assert plan["memory_estimate_bytes"]["adapter_weights"] == 4 * 384


def test_merge_and_every_export_give_the_adapter_models_outputs(runs, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    import warnings

    from transformers import AutoModelForCausalLM

    _, run_dir, _ = runs["a"]
    adapted = _logits(_peft_model(tiny_model_dir, run_dir).eval(), IDS)
    res = run_json("merge", run_dir, "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4 and res["combination_type"] is None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, IDS), adapted, rtol=0, atol=1e-5)

    run_json("export", run_dir, "--format", "peft", "-o", tmp_path / "share")
    card = (tmp_path / "share" / "README.md").read_text()
    assert "tags: [peftctl, ia3]" in card and "| feedforward_modules | ['down_proj'] |" in card
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "share")
    torch.testing.assert_close(_logits(theirs.eval(), IDS), adapted, rtol=0, atol=1e-5)

    assert run_json("export", run_dir, "--format", "merged", "-o", tmp_path / "hf")["format"] == "merged"
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), IDS), adapted,
                               rtol=0, atol=1e-5)
    res = run_json("export", run_dir, "--format", "gguf", "--dtype", "float32", "-o", tmp_path / "gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(back, IDS), _logits(merged, IDS), rtol=0, atol=1e-5)


def test_runs_combine_as_peft_does_and_what_ia3_cannot_do_is_refused(runs, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the reference for the combination")
    from transformers import AutoModelForCausalLM

    a, b = runs["a"][1], runs["b"][1]
    res = run_json("merge", a, b, "--weights", "0.6,0.4", "-o", tmp_path / "m")
    assert res["combination_type"] == "linear" and res["max_logit_diff"] < 1e-4
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), a, adapter_name="a")
    ref.load_adapter(b, adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix")
    ref.set_adapter("mix")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(merged, IDS), _logits(ref.eval(), IDS), rtol=0, atol=1e-5)
    res = run_json("merge", a, b, "--weights", "0.6,0.4", "--adapter-only", "-o", tmp_path / "c")
    assert res["mode"] == "adapter" and res["method"] == "ia3"
    assert run_json("inspect", tmp_path / "c")["adapter_params"] == 2 * (32 + 32 + 64 + 128)

    for args, says in (
        (("--combination", "cat"), "--combination cat is not defined for IA3 adapters; they combine with: linear"),
        (("--adapter-only", "--rank", "2"), "resize_adapter_rank is defined for LoRA adapters only"),
    ):
        r = run("merge", a, b, *args, "-o", tmp_path / "x", code=2)
        assert says in r.stderr, r.stderr
    r = run("merge", a, runs["lora"][1], "-o", tmp_path / "x", code=2)
    assert "the adapters are of different methods (IA3, LORA)" in r.stderr
    assert not (tmp_path / "x").exists()


def test_ia3_recipes_are_checked_like_any(make_recipe):
    recipe = make_recipe(adapter={"method": "ia3", "target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]})
    r = run("validate", recipe, code=2)
    assert f"{recipe}:" in r.stderr and "feedforward_modules must be a subset of target_modules" in r.stderr
    r = run("validate", make_recipe(adapter={"method": "ia3", "r": 4}), code=2)
    assert "adapter.r" in r.stderr
    r = run("validate", make_recipe(adapter=IA3, train={"loraplus_lr_ratio": 16}), code=2)
    assert "loraplus_lr_ratio (LoRA+) sets the learning rate of LoRA's B matrices; a ia3 adapter has none" in r.stderr


def test_ia3_on_a_4bit_base_trains_and_merges_in_full_precision(make_recipe, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes quantizes the base")
    recipe = make_recipe(adapter=IA3, model={"quantization": {"bits": 4}}, train={"max_steps": 2, "lr": 5e-2})
    summary = run_json("train", recipe)
    assert summary["status"] == "completed" and summary["trainable_params"] == DEFAULT_PARAMS
    res = run_json("merge", tmp_path / "run", "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4 and 0 < res["vs_quantized_training_model"]["top1_agreement"] <= 1
