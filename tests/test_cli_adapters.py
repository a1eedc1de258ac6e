"""`peftctl inspect RUN_DIR` and `peftctl merge` over several runs, end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run, run_json
from tiny import recipe_text


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, chat_data):
    """Two short training runs on the same base: one with a trained head, one with rsLoRA."""
    folder = tmp_path_factory.mktemp("runs")
    adapters = {
        "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
        "b": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"], "use_rslora": True},
    }
    for name, adapter in adapters.items():
        recipe = folder / f"{name}.yaml"
        recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), None, name,
                                      adapter=adapter, train={"max_steps": 3, "log_every": 3}))
        run_json("train", recipe)
    return folder / "a", folder / "b"


def test_inspect_describes_a_saved_adapter(two_runs):
    res = run_json("inspect", two_runs[0])
    assert res["method"] == "lora" and res["config"]["r"] == 4 and res["config"]["modules_to_save"] == ["lm_head"]
    assert [m["module"] for m in res["modules"]] == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(m["rank"] == 4 and m["scaling"] == 2.0 for m in res["modules"])
    assert res["other_tensors"] == {"lm_head.weight": [320, 64]}
    # every saved number is counted once: 2 layers x (q: 4x64 + 64x4, v: 4x64 + 32x4) + the head
    assert res["adapter_params"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) + 320 * 64
    assert res["run"]["status"] == "completed" and res["run"]["steps"] == 3
    text = run("inspect", two_runs[0]).stdout
    assert "model.layers.0.self_attn.q_proj" in text and "lm_head.weight" in text


def test_merge_several_adapters_matches_peft(two_runs, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the reference for the combination")
    from transformers import AutoModelForCausalLM

    res = run_json("merge", *two_runs, "--weights", "0.7,0.3", "-o", tmp_path / "m")
    assert res["mode"] == "model" and res["combination_type"] == "cat" and res["max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), two_runs[0], adapter_name="a")
    ref.load_adapter(two_runs[1], adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    # Deliberately unlike PEFT, the combination keeps the head run "a" trained (PEFT starts a
    # fresh copy of the base head); give PEFT's combination that head too.
    heads = ref.base_model.model.lm_head.modules_to_save
    heads["mix"].load_state_dict(heads["a"].state_dict())
    ref.set_adapter("mix")
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_combine_into_an_adapter_and_resize(two_runs, tmp_path):
    res = run_json("merge", *two_runs, "--adapter-only", "--combination", "svd", "--svd-rank", "2", "-o", tmp_path / "c")
    assert res["mode"] == "adapter" and res["r"] == 2
    described = run_json("inspect", tmp_path / "c")
    assert {m["rank"] for m in described["modules"]} == {2} and len(described["modules"]) == 6
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["lora_alpha"] == 2
    res = run_json("merge", two_runs[0], "--adapter-only", "--rank", "2", "-o", tmp_path / "small")
    assert res["r"] == 2 and 0 < res["resize"]["max_relative_error"] < 1
    assert {m["rank"] for m in run_json("inspect", tmp_path / "small")["modules"]} == {2}


def test_merge_input_errors_exit_2(two_runs, tmp_path):
    r = run("merge", *two_runs, "--weights", "1", "-o", tmp_path / "x", code=2)
    assert "--weights has 1 values for 2 adapters" in r.stderr
    r = run("merge", *two_runs, "--combination", "ties", "-o", tmp_path / "x", code=2)
    assert "--combination ties needs --density" in r.stderr
    r = run("merge", two_runs[0], "--rank", "2", "-o", tmp_path / "x", code=2)
    assert "--adapter-only" in r.stderr
    assert not (tmp_path / "x").exists()
    r = run("inspect", tmp_path, code=2)
    assert "no adapter here" in r.stderr


def test_recipe_adapter_options_validate_with_lines(make_recipe):
    recipe = make_recipe(adapter={"use_dora": True, "init_lora_weights": "loftq", "rank_pattern": {"v_proj": 0}})
    r = run("validate", recipe, code=2)
    assert f"{recipe}:" in r.stderr and "adapter.init_lora_weights: init_lora_weights must be true, false" in r.stderr
    assert "adapter.rank_pattern: rank_pattern ranks must be >= 1 (got 0 for 'v_proj')" in r.stderr
    recipe = make_recipe(adapter={"use_dora": True, "rank_pattern": {"v_proj": 2}, "modules_to_save": ["lm_head"]})
    res = run_json("inspect", recipe)
    assert {m["module"]: list(m["rank"].values()) for m in res["modules"]}["model.layers.0.self_attn.v_proj"] == [2]
    assert any(m["module"] == "lm_head" and m["trainable_params"] == 320 * 64 for m in res["modules"])


def test_export_of_a_pissa_run_is_plain_lora_for_the_original_base(make_recipe, tmp_path, tiny_model_dir):
    """PEFT redoes a pissa_niter init with its own random generator when it loads such an adapter,
    so the file as trained loads away from the run. The export is the equivalent plain LoRA: PEFT
    loads it on the original base with the run's outputs (float32 sums in another order: ~1e-6)."""
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    recipe = make_recipe(adapter={"init_lora_weights": "pissa_niter_4", "r": 4, "lora_alpha": 8,
                                  "target_modules": ["q_proj", "v_proj"]}, train={"max_steps": 2})
    run_json("train", recipe)
    run_dir = tmp_path / "run"
    res = run_json("export", run_dir, "--format", "peft", "-o", tmp_path / "share")
    assert res["converted_from"] == "pissa_niter_4"
    cfg = json.loads((tmp_path / "share" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert "equivalent plain LoRA" in (tmp_path / "share" / "README.md").read_text()
    ids = torch.randint(0, 300, (2, 12))
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    with torch.no_grad():
        want = PeftModel.from_pretrained(base(), run_dir)(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(base(), tmp_path / "share")(input_ids=ids).logits
        as_trained = peft.PeftModel.from_pretrained(base(), run_dir)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (as_trained - want).abs().max() > 1e-3  # the unconverted file, in PEFT: its own init, another base
    # merge --adapter-only would write that unconverted file: refused, pointing at export
    r = run("merge", run_dir, "--adapter-only", "-o", tmp_path / "ao", code=2)
    assert "init_lora_weights: pissa_niter_4" in r.stderr and "peftctl export RUN --format peft" in r.stderr
    assert not (tmp_path / "ao").exists()


def test_misspelt_pattern_keys_are_refused_before_any_work(make_recipe, tmp_path):
    """{q_porj: 16} was ignored by validate, inspect, the dry run and training alike."""
    recipe = make_recipe(adapter={"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_porj": 16}})
    for command in (["validate"], ["inspect"], ["train", "--dry-run"]):
        r = run(*command, recipe, code=2)
        assert "rank_pattern key 'q_porj' matches no module that target_modules selects (q_proj, v_proj); " \
               "did you mean q_proj" in r.stderr, command
    # With the model's default targets only the model says which modules are adapted: inspect, the
    # dry run and train check against it (validate loads no model).
    recipe = make_recipe(adapter={"r": 4, "target_modules": None, "alpha_pattern": {"q_porj": 16}})
    for command in (["inspect"], ["train", "--dry-run"], ["train"]):
        r = run(*command, recipe, code=2)
        assert "alpha_pattern key(s) 'q_porj' match no module this adapter adapts; did you mean: q_proj" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_loads_with_peft_auto_class(two_runs, tiny_model_dir):
    """A recipe run records its task type, so PEFT's AutoPeftModelForCausalLM loads the run folder
    alone (base model from base_model_name_or_path) and gives peftctl's outputs."""
    peft = pytest.importorskip("peft", reason="peft is the interop reference")
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    run_dir = two_runs[1]
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(tiny_model_dir)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(run_dir)
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


def test_adapter_task_type_must_match_model_task(make_recipe):
    recipe = make_recipe(adapter={"task_type": "SEQ_CLS"})
    r = run("validate", recipe, code=2)
    assert "adapter.task_type SEQ_CLS does not match model.task causal_lm (CAUSAL_LM); set model.task" in r.stderr
    run("validate", make_recipe(adapter={"task_type": "CAUSAL_LM"}))


def test_combined_adapter_keeps_layer_ranks_and_biases(tmp_path, tiny_model_dir, chat_data):
    """A run with rank_pattern and lora_bias, combined with itself at weights 0.5 and 0.5 (cat, or
    svd at each layer's own rank), is the run's adapter again: ranks, biases and outputs."""
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    recipe = tmp_path / "r.yaml"
    adapter = {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 1}, "lora_bias": True}
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), None, "run", adapter=adapter,
                                  train={"max_steps": 3, "log_every": 3, "lr": 0.05}))
    run_json("train", recipe)
    run_dir = tmp_path / "run"
    ids = torch.randint(0, 300, (2, 10))

    def outputs(folder):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        with torch.no_grad():
            return model(input_ids=ids).logits

    expected = outputs(run_dir)
    for combination, rank in (("cat", 8), ("svd", 4)):
        out = tmp_path / combination
        res = run_json("merge", run_dir, run_dir, "--weights", "0.5,0.5", "--adapter-only",
                       "--combination", combination, "-o", out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert res["r"] == cfg["r"] == rank and cfg["lora_bias"] is True
        assert cfg["rank_pattern"] == {rf"model\.layers\.{i}\.self_attn\.v_proj": rank // 4 for i in (0, 1)}
        assert torch.allclose(outputs(out), expected, atol=1e-4), combination


def test_merged_model_with_a_trained_head_is_untied(tmp_path, chat_data):
    """modules_to_save: [lm_head] on a model with tied embeddings: the merged folder says the
    embeddings are not tied, so re-tying (tie_weights, as loading and resizing do) keeps the head."""
    from tiny import build_tiny_llama
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    base_dir = build_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(base_dir, str(chat_data[0]), None, str(tmp_path / "run"),
                                  adapter={"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
                                  train={"max_steps": 3, "log_every": 3, "lr": 0.05}))
    run_json("train", recipe)
    res = run_json("merge", tmp_path / "run", "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.tie_word_embeddings is False
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "run")
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        merged.tie_weights()
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
