"""AdaLoRA through the CLI end to end on the tiny model: a run prunes on its schedule with gradient
accumulation and saves PEFT's format (rank_pattern, cut tensors), inspect (recipe and run), the dry
run's memory estimate, eval, merge, export (peft, merged, gguf); a SIGKILLed run resumes bit for bit;
two processes train as one; recipes are checked like any."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from clirun import gloo_env, run, run_json
from safetensors.torch import load_file
from test_train_faults import spawn, train_records, wait_for
from tiny import recipe_text

from peftctl.train.checkpoint import HOOKS_FILE

# q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers, init_r 4: Q 4x64, Λ 4x1, P out x 4 each.
MODULES = 4
PARAMS = 2 * ((4 * 64 + 4 + 64 * 4) + (4 * 64 + 4 + 32 * 4))
ADALORA = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "lora_alpha": 8,
           "target_modules": ["q_proj", "v_proj"]}
# 8 optimizer steps of 2 micro-batches each. total_step is fixed and the learning rate constant, so
# that a killed attempt with a longer max_steps trains its first steps as this run does.
TRAIN = {"max_steps": 8, "grad_accum": 2, "batch_size": 2, "save_every": 2, "keep_checkpoints": 100, "log_every": 1,
         "lr": 0.02, "scheduler": "constant", "warmup_steps": 0, "seed": 0}
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def budget(step, init=MODULES * 4, target=MODULES * 2, tinit=1, tfinal=2, total=8):
    """PEFT's cubic schedule, written out (Zhang et al. 2023, eq. 12)."""
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


@pytest.fixture(scope="module")
def ada_run(tmp_path_factory, tiny_model_dir, chat_data):
    folder = tmp_path_factory.mktemp("adalora")
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), str(folder / "run"),
                                  adapter={**ADALORA, "total_step": 8}, train=TRAIN))
    return recipe, folder / "run", run_json("train", recipe)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_model(base_dir, run_dir):
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir).eval()


def test_a_run_prunes_on_its_schedule_and_saves_peft_s_format(ada_run):
    recipe, run_dir, summary = ada_run
    assert summary["status"] == "completed" and summary["trainable_params"] == PARAMS
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["total_step"] == 8
    kept = {k: sum(v) for k, v in cfg["rank_pattern"].items()}
    assert len(kept) == MODULES and sum(kept.values()) == budget(6) == MODULES * 2  # the final budget
    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    for key, rank in kept.items():  # the file holds the surviving triplets only (PEFT's layout)
        module = "base_model.model." + key.removesuffix(".lora_E")
        assert saved[module + ".lora_E"].shape == (rank, 1) and saved[module + ".lora_A"].shape == (rank, 64)

    # One allocation per optimizer step (not per micro-batch), numbered 1..8: the masks of the
    # checkpoints keep the budget of their step; the checkpoints hold every triplet (to resume).
    for step in (4, 6):
        ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
        state = torch.load(ckpt / HOOKS_FILE, weights_only=True)["default"]
        assert sum(int(m.sum()) for m in state["masks"].values()) == budget(step)
        assert bool(state["exp_avg_ipt"]) == (step < 6)  # the averages end with the final allocation
        full = load_file(str(ckpt / "adapter_model.safetensors"))
        assert all(t.shape[0] == 4 for k, t in full.items() if k.endswith(("lora_A", "lora_E")))
        assert json.loads((ckpt / "adapter_config.json").read_text())["rank_pattern"] is None
    records = train_records(run_dir)
    assert len(records) == 8 and all(m["loss_terms"]["orth_reg"] > 0 for m in records)

    res = run_json("inspect", run_dir)
    assert res["method"] == "adalora" and res["adapter_params"] == sum(
        r * (64 + 1) + r * (64 if "q_proj" in k else 32) for k, r in kept.items())
    ranks = {m["module"]: m["rank"] for m in res["modules"]}
    assert ranks == {k.removesuffix(".lora_E"): r for k, r in kept.items()}
    assert "rank" in run("inspect", run_dir).stdout
    tuned = run_json("eval", recipe)
    assert tuned["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)


def test_inspect_a_recipe_and_its_dry_run(ada_run):
    recipe, _, _ = ada_run
    res = run_json("inspect", recipe, "--memory")
    assert res["method"] == "adalora" and res["trainable_params"] == PARAMS
    assert {m["adapter"]["default"] for m in res["modules"]} == {"r=4 of init_r=4"}
    mem = res["memory"]
    # float32 weights, their gradients, AdamW's two moments (ranknum is frozen, not counted as trained)
    assert (mem["adapter_weights"], mem["gradients"], mem["optimizer_states"]) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS)
    plan = run_json("train", recipe, "--dry-run", "--set", "output.dir=elsewhere")
    assert plan["method"] == "adalora" and plan["trainable_params"] == PARAMS and plan["adapted_modules"] == MODULES
    assert plan["memory_estimate_bytes"]["adapter_weights"] == 4 * PARAMS


def test_merge_and_every_export_give_the_adapter_models_outputs(ada_run, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    from transformers import AutoModelForCausalLM

    _, run_dir, _ = ada_run
    adapted = _logits(_peft_model(tiny_model_dir, run_dir))
    res = run_json("merge", run_dir, "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)

    run_json("export", run_dir, "--format", "peft", "-o", tmp_path / "share")
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
    r = run("merge", run_dir, run_dir, "-o", tmp_path / "x", code=2)
    assert "ADALORA" in r.stderr and not (tmp_path / "x").exists()


def test_a_sigkilled_run_resumes_bit_for_bit(ada_run, tmp_path):
    """The same recipe killed (SIGKILL) while pruning, then resumed from its step-4 checkpoint: the
    averages, the masks, the optimizer and the data position come back, and the run ends exactly
    where the uninterrupted one did (the same bytes). The killed attempt runs with a longer
    max_steps so that it is still training when killed (total_step and the learning rate do not
    depend on it)."""
    recipe, whole, _ = ada_run
    out = tmp_path / "killed"
    proc = spawn("train", recipe, "--set", "train.max_steps=100000", "--set", f"output.dir={out}")
    ckpt = out / "checkpoints" / "step-000004"
    wait_for(lambda: (ckpt / "peftctl_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "summary.json").exists()
    s = run_json("train", recipe, "--set", f"output.dir={out}", "--resume", ckpt)
    assert s["status"] == "completed" and s["resumed_from"] == str(ckpt)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    a, b = (torch.load(w / "checkpoints" / "step-000006" / HOOKS_FILE, weights_only=True)["default"]
            for w in (whole, out))
    assert a["masks"].keys() == b["masks"].keys() and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])


def test_two_processes_allocate_from_the_reduced_gradients(ada_run, tmp_path):
    """Batch 2 on each of 2 processes against the run's 2 micro-batches of 2 on one: the sensitivities
    come from the step's gradients as DDP has averaged them, so the masks are the same and the weights
    agree to float32 sums in another order (1e-5); a process scoring its own gradients would keep
    other triplets. total_step unset: the run's 8 optimizer steps."""
    recipe, whole, _ = ada_run
    out = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "peftctl", "train", str(recipe), "--num-processes", "2", "--json",
                        "--set", "train.grad_accum=1", "--set", "train.save_every=null", "--set",
                        f"output.dir={out}", "--set", "adapter.total_step=null"], env=gloo_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfgs = [json.loads((w / "adapter_config.json").read_text()) for w in (whole, out)]
    assert cfgs[1]["total_step"] == 8 and cfgs[0]["rank_pattern"] == cfgs[1]["rank_pattern"]
    a, b = (load_file(w / "adapter_model.safetensors") for w in (whole, out))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


def test_adalora_recipes_are_checked_like_any(make_recipe):
    bad = make_recipe(adapter={**ADALORA, "total_step": 3})
    r = run("validate", bad, code=2)
    assert f"{bad}:" in r.stderr and "tinit (1) must be below total_step - tfinal (3 - 2)" in r.stderr
    r = run("validate", make_recipe(adapter={**ADALORA, "rank_pattern": {"q_proj": [True]}}), code=2)
    assert "rank_pattern is written by AdaLoRA's training" in r.stderr
    r = run("validate", make_recipe(adapter={**ADALORA, "r": 4}), code=2)
    assert "adapter.r" in r.stderr
    r = run("validate", make_recipe(adapter=ADALORA, train={"loraplus_lr_ratio": 16}), code=2)
    assert "a adalora adapter has none" in r.stderr
    # total_step unset: the run's 3 steps leave no budgeting phase after tinit 1 and tfinal 2.
    r = run("train", make_recipe(adapter=ADALORA, train={"max_steps": 3}), code=2)
    assert "adapter: tinit (1) must be below total_step - tfinal (3 - 2)" in r.stderr
