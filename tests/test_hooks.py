"""What an adapter method may plug into the shared machinery, with a test-only method
(tests/hooked_ia3: IA3 plus a loss term pull * sum((l - 1)^2), an after-step action that records the
step and its gradients, and a frozen vector kept outside the layers): the training loop's hooks
(`peftctl.adapters.hooks`) end to end through `peftctl train`, and model-level state.

- A loss term enters each optimizer step once, whatever the gradient accumulation: with SGD and no
  clipping, one step with the term and one without differ by exactly -lr * d(term)/dl.
- The after-step action runs once per optimizer step, with the step's gradients still there.
- Its state goes into each checkpoint, and a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clirun import run, run_json
from safetensors.torch import load_file

from peftctl.train.checkpoint import HOOKS_FILE


@pytest.fixture
def hooked_method(monkeypatch):
    """Register the test method, and let recipes name it (the recipe's adapter union is rebuilt)."""
    from peftctl.adapters import registry
    from peftctl.recipe import schema as recipe_lib

    monkeypatch.setitem(registry.METHODS, "ia3_hooked", "hooked_ia3")
    registry.config_class.cache_clear()
    field = recipe_lib.Recipe.model_fields["adapter"]
    before = field.annotation
    field.annotation = recipe_lib._adapter_type()
    recipe_lib.Recipe.model_rebuild(force=True)
    yield
    field.annotation = before
    recipe_lib.Recipe.model_rebuild(force=True)
    registry.config_class.cache_clear()


def _as_if_killed_after_step_2(run_dir) -> None:
    """What a run killed during step 3 leaves: no summary, no final adapter, checkpoints to step 2."""
    for name in ("summary.json", "adapter_model.safetensors", "adapter_config.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def test_a_loss_term_counts_once_per_step_whatever_the_accumulation(hooked_method, make_recipe, tmp_path):
    from accelerate.utils import set_seed

    from peftctl import recipe as recipe_lib
    from peftctl.train import prepare_model

    lr, pull = 0.1, 0.5
    train = {"max_steps": 1, "grad_accum": 2, "batch_size": 2, "optimizer": "sgd", "lr": lr, "scheduler": "constant",
             "warmup_steps": 0, "max_grad_norm": None, "seed": 0}
    ends = {}
    for weight in (pull, 0.0):
        recipe = make_recipe(f"run-{weight}", adapter={"method": "ia3_hooked", "init_ia3_weights": False, "pull": weight},
                             train=train)
        run_json("train", recipe)
        ends[weight] = _adapter(tmp_path / f"run-{weight}")
    set_seed(0)  # the start both runs had: the seeded random vectors
    start, _ = prepare_model(recipe_lib.load(recipe))
    start = {k: t for k, t in start.adapter_tensors_to_save("default").items() if k.endswith(".ia3_l")}
    assert len(start) == 6 and start.keys() < ends[pull].keys()
    for key, l0 in start.items():
        # The token loss's gradient is the same in both runs (same start, same batches); the term adds
        # 2 * pull * (l0 - 1) once (not once per micro-batch). float32: ~1e-7 of values around 1.
        expected = ends[0.0][key] - lr * 2 * pull * (l0 - 1)
        torch.testing.assert_close(ends[pull][key], expected, rtol=0, atol=2e-6, msg=key)
        assert (ends[pull][key] - ends[0.0][key]).abs().max() > 1e-2  # the term mattered


def test_after_step_hooks_and_their_state_survive_a_resume(hooked_method, make_recipe, tmp_path):
    train = {"max_steps": 4, "grad_accum": 2, "batch_size": 2, "save_every": 2, "log_every": 1, "seed": 0}
    recipe = make_recipe("whole", adapter={"method": "ia3_hooked", "pull": 0.1, "target_modules": ["v_proj",
                                                                                                    "down_proj"]},
                         train=train)
    run_json("train", recipe)
    whole = tmp_path / "whole"
    state = torch.load(whole / "checkpoints" / "step-000004" / HOOKS_FILE, weights_only=True)
    assert list(state) == ["default"] and state["default"]["steps"] == [1, 2, 3, 4]  # once per optimizer step
    assert state["default"]["grad_sq"] > 0  # the gradients were still there
    half = torch.load(whole / "checkpoints" / "step-000002" / HOOKS_FILE, weights_only=True)
    assert half["default"]["steps"] == [1, 2]
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    terms = [m["loss_terms"]["pull"] for m in metrics if "loss_terms" in m]
    assert len(terms) == 4 and terms[0] == 0.0 < terms[-1]  # the vectors start at 1 and move

    # A run resumed from step 2 (in a copy of the folder) ends exactly where the whole run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    _as_if_killed_after_step_2(resumed)
    run_json("train", recipe, "--set", f"output.dir={resumed}", "--resume", "auto")
    again = torch.load(resumed / "checkpoints" / "step-000004" / HOOKS_FILE, weights_only=True)
    assert again["default"]["steps"] == [1, 2, 3, 4]
    assert torch.equal(again["default"]["grad_sq"], state["default"]["grad_sq"])
    for key, t in _adapter(whole).items():
        assert torch.equal(_adapter(resumed)[key], t), key

    # A checkpoint without the method's state cannot continue the run: exit 2 naming the file.
    (resumed / "checkpoints" / "step-000002" / HOOKS_FILE).unlink()
    _as_if_killed_after_step_2(resumed)
    r = run("train", recipe, "--set", f"output.dir={resumed}", "--resume", "auto", code=2)
    assert f"{HOOKS_FILE}: missing" in r.stderr and "training state" in r.stderr


def test_state_outside_the_layers_is_made_first_handed_to_the_layers_saved_and_loaded(hooked_method, tiny_llama,
                                                                                       tmp_path):
    """A method's model-level state (VeRA's shared projections are such): `before_inject` makes it
    from the target list, each layer receives it, `model_tensors` saves and loads it under its own
    key, and it goes with its adapter (deleted, or never kept when the adapter fails to attach)."""
    from hooked_ia3.config import HookedIA3Config

    from peftctl import PeftModel, get_peft_model

    config = HookedIA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    shared = model.base_model.method_state["default"]
    assert shared.targets == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj")]
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.states["default"] is shared
    model.add_adapter("second", config)
    assert layer.states["second"] is model.base_model.method_state["second"] is not shared
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.hooked_gain"], shared.gain) and len(saved) == 5

    torch.manual_seed(1)  # another random gain, which loading replaces
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded.base_model.method_state["default"].gain, shared.gain)
    model.delete_adapter("second")
    assert list(model.base_model.method_state) == ["default"]
    with pytest.raises(TypeError, match="model.embed_tokens is a .*Embedding"):  # no layer for it: nothing kept
        model.add_adapter("third", config.model_copy(update={"target_modules": ["v_proj", "embed_tokens"]}))
    assert list(model.base_model.method_state) == ["default"] and "third" not in model.peft_config
