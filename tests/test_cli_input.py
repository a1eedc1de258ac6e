"""Bad input at the command line, end to end: hostile recipes, flags checked before any work, model
folders `validate` reads without loading, models that need their own code, unreadable data, and
`--json` on failure. Each ends as exit 2 with one message naming the file (and line, field) or flag,
and nothing written."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from clirun import run, run_json
from tiny import alias_bomb


def errors_json(*args, code=2) -> dict:
    """The one JSON object a failing `--json` command prints on stdout."""
    result = run(*args, "--json", code=code)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def test_hostile_yaml_is_refused_at_once_with_its_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    start = time.perf_counter()
    out = errors_json("validate", bomb)
    assert time.perf_counter() - start < 10  # 53 s and 1.2 GiB before; about 0.2 s now
    assert out["valid"] is False and out["ok"] is False and out["exit_code"] == 2
    assert out["errors"] == [{"source": str(bomb), "line": 6, "path": "f", "message":
                              "more than 100,000 values once YAML aliases are expanded (an alias repeats all it "
                              "names); a recipe is far smaller"}]
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    r = run("train", deep, code=2)
    assert r.stderr == f"error: {deep}:1: nested deeper than 64 levels\n"
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("a: &x [*x]\n")
    r = run("inspect", recursive, code=2)
    assert r.stderr == f"error: {recursive}:1 a.0: a YAML alias inside the value it names (a recursive alias)\n"


def test_validate_json_lists_every_problem_with_its_place(make_recipe):
    recipe = make_recipe(train={"lr": ".inf", "seed": -1})
    out = errors_json("validate", recipe, "--set", "nope.x=1", "--set", "adapter.lora_alpha=1e400")
    lines = recipe.read_text().splitlines()
    lr_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("lr:"))
    seed_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("seed:"))
    assert {(e["source"], e["line"], e["path"]) for e in out["errors"]} == {
        (str(recipe), lr_line, "train.lr"),
        (str(recipe), seed_line, "train.seed"),
        ("--set nope.x=1", None, "nope"),
        ("--set adapter.lora_alpha=1e400", None, "adapter.lora_alpha"),
    }
    assert out["recipe"] == str(recipe) and out["valid"] is False
    # the same problems on stderr, one line each, without a traceback
    r = run("validate", recipe, "--set", "nope.x=1", code=2)
    assert "--set nope.x=1 nope: unknown field" in r.stderr and f"{recipe}:1 nope" not in r.stderr


def test_every_json_command_prints_json_on_failure(make_recipe, tmp_path):
    missing = tmp_path / "missing.yaml"
    for command in ("inspect", "train", "data", "prepare", "eval"):
        out = errors_json(command, missing)
        assert out == {"ok": False, "exit_code": 2, "errors": [
            {"source": str(missing), "line": None, "path": None, "message": "recipe file not found"}]}, command
    # errors the flag parser finds, before the command runs
    out = errors_json("merge", tmp_path)
    assert out["errors"][0]["source"] == "--output" and "Missing option" in out["errors"][0]["message"]
    out = errors_json("train", make_recipe(), "--num-processes", "two")
    assert out["errors"][0]["source"] == "--num-processes"
    out = errors_json("report", tmp_path / "nowhere")
    assert out["ok"] is False and str(tmp_path / "nowhere") in out["errors"][0]["message"]


def test_flags_are_checked_before_any_work(make_recipe, tmp_path):
    """Each flag's error comes first: here the run folders do not even exist, so an error about the
    flag proves that nothing was read before it was checked."""
    nowhere, out = tmp_path / "no-run", tmp_path / "out"

    def refused(*args, says):
        start = time.perf_counter()
        result = run(*args, code=2)
        assert says in result.stderr, result.stderr
        assert time.perf_counter() - start < 20  # no model loaded, nothing merged
        assert not out.exists()
        return result

    refused("merge", nowhere, "-o", out, "--max-shard-size", "banana",
            says="--max-shard-size must be a size such as 500MB, 2GB or 4GiB (or a number of bytes), got 'banana'")
    refused("merge", nowhere, "-o", out, "--max-shard-size", "0GB", says="--max-shard-size must be a size")
    refused("export", nowhere, "--format", "merged", "-o", out, "--max-shard-size", "5.5GB",
            says="--max-shard-size must be a size")
    refused("export", nowhere, "-o", out, "--max-shard-size", "1GB", says="--max-shard-size applies to --format merged")
    refused("export", nowhere, "-o", out, "--dtype", "float16", says="--dtype applies to --format merged or gguf")
    refused("export", nowhere, "--format", "gguf", "-o", out, "--dtype", "int4", says="--dtype must be")
    refused("merge", nowhere, "-o", out, "--density", "0.5", says="--density applies to combining several adapters")
    refused("merge", nowhere, "-o", out, "--combination", "svd", says="--combination combines several adapters")
    refused("merge", nowhere, nowhere, "-o", out, "--svd-rank", "2", says="--svd-rank applies to the svd combinations")
    refused("merge", nowhere, nowhere, "-o", out, "--combination", "svd", "--svd-rank", "0",
            says="--svd-rank must be >= 1")
    refused("merge", nowhere, nowhere, "-o", out, "--combination", "ties", "--density", "1.5",
            says="--density must be a fraction between 0 and 1")
    refused("merge", nowhere, nowhere, "-o", out, "--combination", "dare_ties",
            says="--combination dare_ties needs --density")
    refused("merge", nowhere, nowhere, "-o", out, "--weights", "nan,1", says="--weights must be finite numbers")
    refused("merge", nowhere, "-o", out, "--adapter-only", "--rank", "0", says="--rank must be >= 1")
    refused("merge", nowhere, "-o", out, "--adapter-only", "--max-shard-size", "1GB",
            says="--max-shard-size applies to a merged model")
    # recipe commands: flags the recipe makes meaningless, found before the data or model is read
    no_eval = make_recipe(data={"eval": None})
    refused("data", no_eval, "--split", "eval", says="--split eval: the recipe has no eval data")
    refused("eval", no_eval, "--base", says="no eval data: set data.eval or data.eval_split")
    refused("train", make_recipe(), "--resume", nowhere, says=f"--resume {nowhere}: not a checkpoint folder")
    refused("inspect", tmp_path, "--set", "adapter.r=2", says="--set applies to a recipe")
    refused("inspect", tmp_path, "--memory", says="--memory applies to a recipe")


def _remote_code_model(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model, with a config that only its own (absent) Python code could build."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_that_needs_its_own_code_is_refused_alike_everywhere(make_recipe, tiny_model_dir, tmp_path):
    model = _remote_code_model(tiny_model_dir, tmp_path / "custom")
    recipe = make_recipe(model={"name_or_path": str(model)})
    message = (f"model {model} needs its own code to run (its config's auto_map names Python files in the model); "
               "set model.trust_remote_code: true if you trust that code")
    for command in (["validate"], ["inspect"], ["inspect", "--memory"], ["train", "--dry-run"], ["train"]):
        r = run(*command, recipe, code=2)
        errors = [line for line in r.stderr.splitlines() if line.startswith(("error", " "))]
        # one line, no traceback; validate places it at the recipe's line
        where = f"{recipe}:2 model.name_or_path: " if command == ["validate"] else ""
        assert errors == [f"error: {where}{message}"], command
    assert not (tmp_path / "run").exists()


def test_validate_reads_a_model_folder_without_loading_it(make_recipe, tiny_model_dir, tmp_path):
    def problems(folder: Path, **model) -> str:
        r = run("validate", make_recipe(model={"name_or_path": str(folder), **model}), code=2)
        assert "model.name_or_path" in r.stderr and "Traceback" not in r.stderr
        return r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    said = problems(empty)
    assert f"{empty / 'config.json'}: missing (expected a model config (JSON))" in said
    assert f"model {empty}: no weights" in said and f"tokenizer {empty}: no tokenizer files" in said

    def variant(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        return folder

    bad = variant("not-json")
    (bad / "config.json").write_text("{not json")
    assert f"{bad / 'config.json'}: not a model config (JSON)" in problems(bad)
    bad = variant("config-is-a-folder")  # unreadable as a file, whoever runs the test
    (bad / "config.json").unlink()
    (bad / "config.json").mkdir()
    assert f"{bad / 'config.json'}: is a folder, expected a model config (JSON)" in problems(bad)
    bad = variant("truncated")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights}: not a complete safetensors file" in problems(bad)
    bad = variant("pickle-only")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    assert "only pickle weights (pytorch_model.bin)" in problems(bad)
    bad = variant("sharded")
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    assert "names shard(s) missing from the folder: model-00002-of-00002.safetensors" in problems(bad)
    bad = variant("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / name).unlink()
    assert f"tokenizer {bad}: no tokenizer files" in problems(bad)
    # with its own tokenizer location, the model folder needs none
    assert run_json("validate", make_recipe(model={"name_or_path": str(bad), "tokenizer": str(tiny_model_dir)}))["valid"]
    assert run_json("validate", make_recipe())["valid"]


def test_an_unreadable_data_file_stops_every_command_before_the_model_loads(make_recipe, make_unreadable, tmp_path):
    unreadable = make_unreadable(tmp_path / "eval.jsonl")
    recipe = make_recipe(data={"eval": str(unreadable)})
    line = next(i for i, t in enumerate(recipe.read_text().splitlines(), 1) if t.strip().startswith("eval:"))
    said = f"{unreadable}: not readable (permission denied); expected a data file"
    r = run("validate", recipe, code=2)
    assert r.stderr == f"error: {recipe}:{line} data.eval: {said}\n"
    for command in (["train"], ["train", "--dry-run"], ["prepare"], ["eval", "--base"]):
        r = run(*command, recipe, code=2)
        assert r.stderr == f"error: {said}\n", command
    assert not (tmp_path / "run").exists()


def test_a_target_regex_that_does_not_compile_is_a_recipe_error(make_recipe):
    """A string target_modules is a regular expression: one that does not compile is exit 2 at its
    recipe line from validate, the dry run and train alike (not "error: error: ..." after loading)."""
    recipe = make_recipe(adapter={"target_modules": "[q_proj"})
    for args in (["validate"], ["train", "--dry-run"], ["train"]):
        r = run(*args[:1], recipe, *args[1:], code=2)
        assert "adapter.target_modules: invalid regular expression '[q_proj'" in r.stderr, r.stderr
    r = run("validate", make_recipe(), "--set", "adapter.exclude_modules=(v_proj", code=2)
    assert "adapter.exclude_modules: invalid regular expression" in r.stderr and "--set" in r.stderr


def test_options_that_act_on_evaluations_need_eval_data(make_recipe, tmp_path):
    """metric_for_best, greater_is_better, load_best_at_end, early_stopping_patience (and _threshold) and eval_every
    with no eval data (no data.eval, no data.eval_split): the run would evaluate nothing, so the
    recipe is refused (exit 2, the field named), before any work; with eval data they are accepted."""
    from tiny import write_preference_data

    # A preference objective: metric_for_best has values besides eval_loss (a chat sft run has none).
    pairs = write_preference_data(tmp_path / "pairs.jsonl", 8)
    recipe = make_recipe(out=str(tmp_path / "run"), data={"train": str(pairs), "format": "preference", "eval": str(pairs)},
                         train={"objective": "dpo"})
    for flag in ("train.metric_for_best=rewards/accuracies", "train.greater_is_better=true", "train.load_best_at_end=true",
                 "train.early_stopping_patience=2", "train.early_stopping_threshold=0.1", "train.eval_every=2"):
        extra = ("--set", "train.eval_every=2") if "patience" in flag else ()
        for command in (("validate",), ("train",)):
            r = run(*command, recipe, "--set", "data.eval=null", "--set", flag, *extra, code=2)
            assert f"train.{flag.split('.')[1].split('=')[0]} needs eval data" in r.stderr, (command, flag)
    assert not (tmp_path / "run").exists()
    run("validate", recipe, "--set", "train.load_best_at_end=true", "--set", "train.metric_for_best=rewards/accuracies")
    run("validate", recipe, "--set", "data.eval=null", "--set", "data.eval_split=0.25",
        "--set", "train.load_best_at_end=true")
