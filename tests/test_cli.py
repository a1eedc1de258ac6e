"""The CLI end to end on the tiny model: validate, inspect, train, eval, merge, export; exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from clirun import run, run_json


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, chat_data):
    """One training run shared by the tests that read its folder."""
    from tiny import recipe_text

    folder = tmp_path_factory.mktemp("cli")
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), "run",
                                  train={"max_steps": 8, "eval_every": 4}))
    summary = run_json("train", recipe)
    return recipe, folder / "run", summary


def test_train_writes_a_complete_run_folder(trained):
    recipe, run_dir, summary = trained
    names = {p.name for p in run_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl",
            "summary.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    eval_lines = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6, 8]
    assert [x["step"] for x in eval_lines] == [4, 8]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]  # it learns
    assert all(x["tokens_per_s"] > 0 and x["lr"] >= 0 for x in train_lines)
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["inference_mode"] is True
    # the saved recipe is the resolved one and loads again
    from peftctl import recipe as recipe_lib

    again = recipe_lib.load(run_dir / "recipe.yaml")
    assert again.model.dtype == "float32" and again.adapter.r == 4


def test_eval_base_and_adapter(trained):
    recipe, run_dir, summary = trained
    base = run_json("eval", recipe, "--base")
    tuned = run_json("eval", recipe, "--adapter", run_dir)
    assert base["adapter"] is None and tuned["adapter"] == str(run_dir)
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)
    assert tuned["perplexity"] == pytest.approx(torch.tensor(tuned["eval_loss"]).exp().item(), rel=1e-5)
    assert 0.0 <= tuned["exact_match"] <= 1.0 and tuned["exact_match_n"] == 12
    # without a flag, eval uses the recipe's own output.dir
    assert run_json("eval", recipe)["eval_loss"] == tuned["eval_loss"]


def test_merge_gives_the_adapter_models_outputs(trained, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    _, run_dir, _ = trained
    out = tmp_path / "merged"
    res = run_json("merge", run_dir, "-o", out)
    assert res["max_logit_diff"] < 1e-4
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    # a second merge into the same folder is refused and leaves it as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run("merge", run_dir, "-o", out, code=2)
    assert "not empty" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_export_peft_loads_in_peft(trained, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    _, run_dir, _ = trained
    out = tmp_path / "export"
    res = run_json("export", run_dir, "--format", "peft", "-o", out)
    assert "README.md" in res["files"] and "adapter_model.safetensors" in res["files"]
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "```yaml" in card
    ids = torch.randint(0, 300, (1, 10))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir)
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
    merged = run_json("export", run_dir, "--format", "merged", "-o", tmp_path / "m")
    assert merged["format"] == "merged" and (tmp_path / "m" / "config.json").exists()


def test_inspect_and_validate(make_recipe):
    recipe = make_recipe(adapter={"target_modules": "all-linear", "r": 2})
    res = run_json("inspect", recipe)
    assert len(res["modules"]) == 14 and res["method"] == "lora"
    assert res["trainable_params"] == sum(m["trainable_params"] for m in res["modules"])
    assert 0 < res["trainable_percent"] < 100
    v = run_json("validate", recipe)
    assert v["valid"] and v["resolved"]["adapter"]["target_modules"] == "all-linear"


def test_nonempty_output_is_refused_and_untouched(make_recipe, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run("train", make_recipe(out=str(out)), code=2)
    assert "not empty" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_input_exits_2_with_a_message(make_recipe, tmp_path):
    recipe = make_recipe(adapter={"r": 0})
    r = run("validate", recipe, code=2)
    assert f"{recipe}:" in r.stderr and "adapter.r: must be >= 1 (got 0)" in r.stderr
    r = run("train", make_recipe(), "--set", "adapter.target_modules=[nothing_here]", code=2)
    assert "matches no module" in r.stderr and "q_proj" in r.stderr
    assert not (tmp_path / "run").exists()  # bad input leaves nothing behind
    r = run("validate", make_recipe(data={"train": str(tmp_path / "missing.jsonl")}), code=2)
    assert f"data.train: data file {tmp_path / 'missing.jsonl'} not found" in r.stderr
    r = run("eval", make_recipe(), "--adapter", tmp_path, code=2)
    assert "no adapter here" in r.stderr


def test_process_exit_codes_without_traceback(make_recipe, tmp_path):
    """The installed entry point, as a user runs it: exit 2, one message, no traceback."""
    recipe = make_recipe(adapter={"lora_alhpa": 3})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "peftctl", "validate", str(recipe)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert "did you mean 'lora_alpha'?" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "peftctl", "--debug", "validate", str(recipe)],
                       capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_help_is_fast():
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "peftctl", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "train" in p.stdout
    assert time.perf_counter() - start < 3.0
    # It names the methods the README names (rich wraps the line: compare without the layout).
    words = " ".join(w for w in p.stdout.split() if w != "│")
    assert "(LoRA, DoRA, IA3, AdaLoRA, LoHa, LoKr, VeRA; prompt tuning, P-tuning, prefix tuning)" in words
    p = subprocess.run([sys.executable, "-c", "import peftctl.cli, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert p.stdout.strip() == "False"


def test_hub_id_offline_fails_fast_and_clearly(make_recipe):
    start = time.perf_counter()
    r = run("eval", make_recipe(model={"name_or_path": "someone/not-a-local-model"}), "--base", code=2)
    assert "HF_HUB_OFFLINE=1" in r.stderr and "someone/not-a-local-model" in r.stderr
    assert time.perf_counter() - start < 20
