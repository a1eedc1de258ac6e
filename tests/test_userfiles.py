"""Bad files a user hands over, and bad output paths: each is exit 2 with one line naming the file,
no traceback, and nothing written (peftctl/userfiles.py, peftctl/fsio.py), for every command that
reads it; the Python API raises BadFileError (a ValueError) naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run, run_json
from tiny import recipe_text


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, chat_data):
    """(recipe, run folder) of a short run with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("userfiles")
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), "run",
                                  train={"max_steps": 4, "save_every": 2, "eval_every": 4, "log_every": 1}))
    run_json("train", recipe)
    return recipe, folder / "run"


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (links as their target) with a hash of its bytes: to assert nothing changed."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(path))] = "dir"
    return out


def one_line_error(result, *names) -> str:
    """The message of a failed command: one `error:` line, no traceback, naming each of `names`."""
    err = result.stderr
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    assert not any(x.startswith("       ") for x in err.splitlines()), err  # no continuation lines
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# ---- adapter folders ------------------------------------------------------------------------------


def _damage_adapter(folder: Path, kind: str) -> Path:
    """Damage a copy of an adapter folder; returns the file the error must name."""
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:300])
        return weights
    if kind == "truncated_data":  # the header is whole, the tensors are cut short
        weights.write_bytes(weights.read_bytes()[:-1])
        return weights
    if kind == "random":
        weights.write_bytes(os.urandom(4000))
        return weights
    if kind == "huge_header":  # declares a 4 EiB header: refused without allocating it
        weights.write_bytes(struct.pack("<Q", 2**62) + b"{}")
        return weights
    if kind == "config_list":
        config.write_text("[1, 2]")
        return config
    if kind == "config_not_json":
        config.write_text('{"peft_type": "LORA", "r": ')
        return config
    if kind == "unknown_peft_type":  # a PEFT method peftctl does not implement (IA3 became one)
        d = json.loads(config.read_text())
        config.write_text(json.dumps({**d, "peft_type": "OFT"}))
        return config
    if kind == "bad_value":
        d = json.loads(config.read_text())
        config.write_text(json.dumps({**d, "r": "eight"}))
        return config
    if kind == "pickle_only":
        weights.rename(folder / "adapter_model.bin")
        return folder / "adapter_model.bin"
    raise AssertionError(kind)


ADAPTER_DAMAGE = ["truncated", "truncated_data", "random", "huge_header", "config_list", "config_not_json",
                  "unknown_peft_type", "bad_value", "pickle_only"]


@pytest.mark.parametrize("kind", ADAPTER_DAMAGE)
def test_bad_adapter_folder_is_exit_2_naming_the_file_in_every_command(trained, tmp_path, kind):
    recipe, run_dir = trained
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("checkpoints"))
    culprit = _damage_adapter(bad, kind)
    before = tree(bad)
    for args in (["eval", recipe, "--adapter", bad], ["inspect", bad], ["merge", bad, "-o", tmp_path / "out"],
                 ["export", bad, "--format", "peft", "-o", tmp_path / "out"],
                 ["export", bad, "--format", "merged", "-o", tmp_path / "out"]):
        r = run(*args, code=2)
        one_line_error(r, culprit)
        assert not (tmp_path / "out").exists(), args
    assert tree(bad) == before


@pytest.mark.parametrize("kind", ADAPTER_DAMAGE)
def test_python_api_raises_bad_file_error_naming_the_file(trained, tiny_llama, tmp_path, kind):
    from peftctl import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from peftctl.userfiles import BadFileError

    _, run_dir = trained
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("checkpoints"))
    culprit = _damage_adapter(bad, kind)
    with pytest.raises(BadFileError) as e:
        PeftModel.from_pretrained(tiny_llama(), bad)
    assert isinstance(e.value, ValueError) and e.value.path == culprit and str(culprit) in str(e.value)
    if culprit.name == "adapter_config.json":
        with pytest.raises(ValueError, match=str(culprit)):
            PeftConfig.from_pretrained(bad)
        with pytest.raises(ValueError, match=str(culprit)):
            AutoPeftModelForCausalLM.from_pretrained(bad)


def test_an_adapter_folder_without_weights_names_the_missing_file(trained, tiny_llama, tmp_path):
    from peftctl import PeftModel
    from peftctl.userfiles import BadFileError

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(trained[1] / "adapter_config.json", bad)
    with pytest.raises(BadFileError, match="adapter_model.safetensors: missing"):
        PeftModel.from_pretrained(tiny_llama(), bad)


# ---- base models ---------------------------------------------------------------------------------


def _damage_model(folder: Path, kind: str) -> Path | str:
    if kind == "empty":
        for p in folder.iterdir():
            p.unlink()
        return folder / "config.json"
    if kind == "truncated_weights":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return w
    if kind == "config_not_json":
        (folder / "config.json").write_text("not json {")
        return folder / "config.json"
    if kind == "config_list":
        (folder / "config.json").write_text("[1]")
        return folder / "config.json"
    if kind == "no_config":
        (folder / "config.json").unlink()
        return folder / "config.json"
    if kind == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
        return f"tokenizer {folder}: no tokenizer files"
    if kind == "tokenizer_not_json":
        (folder / "tokenizer.json").write_text('{"version": ')
        return folder / "tokenizer.json"
    if kind == "index_outside":  # a shard index naming a file outside the folder: never opened
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../secret.safetensors"}}))
        return folder / "model.safetensors.index.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "truncated_weights", "config_not_json", "config_list", "no_config",
                                  "no_tokenizer", "tokenizer_not_json", "index_outside"])
def test_bad_base_model_folder_is_exit_2_naming_the_file(make_recipe, tiny_model_dir, tmp_path, kind):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    culprit = _damage_model(model, kind)
    recipe = make_recipe(model={"name_or_path": str(model)})
    for args in (["train", recipe], ["train", recipe, "--dry-run"], ["eval", recipe, "--base"]):
        one_line_error(run(*args, code=2), culprit)
    if kind not in ("no_tokenizer", "tokenizer_not_json"):  # inspect needs no tokenizer
        one_line_error(run("inspect", recipe, code=2), culprit)
    assert not (tmp_path / "run").exists()


def test_bad_gguf_base_is_exit_2_naming_the_file(make_recipe, tmp_path):
    not_gguf, truncated = tmp_path / "random.gguf", tmp_path / "truncated.gguf"
    not_gguf.write_bytes(os.urandom(5000))
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(3000))
    for path in (not_gguf, truncated):
        recipe = make_recipe(model={"name_or_path": str(path)})
        one_line_error(run("train", recipe, code=2), path)
        one_line_error(run("inspect", recipe, code=2), path)
    assert not (tmp_path / "run").exists()


# ---- checkpoints --------------------------------------------------------------------------------


def _damage_checkpoint(ckpt: Path, kind: str) -> Path:
    if kind.startswith("no_"):
        name = {"no_optimizer": "optimizer.pt", "no_scheduler": "scheduler.pt", "no_rng": "rng_state.pt",
                "no_recipe": "recipe.yaml", "no_weights": "adapter_model.safetensors"}[kind]
        (ckpt / name).unlink()
        return ckpt / name
    state = ckpt / "peftctl_state.json"
    if kind == "state_list":
        state.write_text("[]")
        return state
    if kind == "state_step_abc":
        state.write_text(json.dumps({**json.loads(state.read_text()), "step": "abc"}))
        return state
    if kind == "truncated_optimizer":
        opt = ckpt / "optimizer.pt"
        opt.write_bytes(opt.read_bytes()[:200])
        return opt
    if kind == "unsafe_pickle":  # weights_only refuses it: loading it would run code
        code = ("import torch, sys\nclass Evil:\n    def __reduce__(self):\n        return (print, ('ran',))\n"
                "torch.save([{'x': Evil()}], sys.argv[1])\n")
        subprocess.run([sys.executable, "-c", code, str(ckpt / "rng_state.pt")], check=True)
        return ckpt / "rng_state.pt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_optimizer", "no_scheduler", "no_rng", "no_recipe", "no_weights", "state_list",
                                  "state_step_abc", "truncated_optimizer", "unsafe_pickle"])
def test_bad_checkpoint_is_exit_2_naming_the_file_and_nothing_changes(trained, tmp_path, kind):
    recipe, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000004")  # step 2 is then the latest: what auto picks
    ckpt = copy / "checkpoints" / "step-000002"
    culprit = _damage_checkpoint(ckpt, kind)
    before = tree(copy)
    for resume in (str(ckpt), "auto"):
        r = run("train", recipe, "--set", f"output.dir={copy}", "--resume", resume, code=2)
        message = one_line_error(r, culprit)
        assert "ran" not in r.stdout  # the pickle's code never ran
        assert not any(x.startswith("loading") for x in r.stderr.splitlines())  # refused before the model loads
        if kind == "unsafe_pickle":
            assert "weights_only" in message
        assert tree(copy) == before


def test_trainer_state_types_are_checked():
    from peftctl.train.checkpoint import TrainState

    state = TrainState.from_dict({"step": 3, "last_loss": 2, "best_step": None, "evals": [{"step": 1}],
                                  "data_sha256": {"train": "ab"}, "a_field_of_a_later_version": 1})
    assert state.step == 3 and state.last_loss == 2 and state.evals == [{"step": 1}]
    for bad, field in (({"step": True}, "step"), ({"step": 1.5}, "step"), ({"step": -1}, "step"), ({"step": 10**30}, "step"),
                       ({"step": 1, "evals": {}}, "evals"), ({"step": 1, "data_sha256": {"train": 1}}, "data_sha256"),
                       ({"step": 1, "best_eval_loss": "low"}, "best_eval_loss"), ({}, "step")):
        with pytest.raises(ValueError, match=field):
            TrainState.from_dict(bad)


# ---- run folders -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "list", "field_type"])
def test_bad_summary_is_exit_2_naming_it(trained, tmp_path, kind):
    _, run_dir = trained
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("checkpoints"))
    summary = bad / "summary.json"
    text = summary.read_text()
    summary.write_text({"truncated": text[:50], "list": "[]",
                        "field_type": json.dumps({**json.loads(text), "final_eval": "good"})}[kind])
    before = tree(bad)
    for args in (["report", bad], ["inspect", bad], ["export", bad, "--format", "peft", "-o", tmp_path / "out"]):
        one_line_error(run(*args, code=2), summary)
    assert not (tmp_path / "out").exists() and tree(bad) == before


def test_metrics_lines_are_checked_but_a_killed_writers_half_line_is_not_an_error(trained, tmp_path):
    _, run_dir = trained
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = bad / "metrics.jsonl"
    good = metrics.read_text()
    n = len(good.splitlines())
    # A half line at the end (no newline): what a kill mid-write leaves; the report reads the rest.
    metrics.write_text(good + '{"step": 5, "lo')
    res = run_json("report", bad, "--no-image")
    assert [p[0] for p in res["loss"]] == [1, 2, 3, 4]
    for garbage, what in (("garbage", f"line {n + 1} is not JSON"), ("[1, 2]", f"line {n + 1} is not a JSON object"),
                          ('{"step": "x", "loss": 1}', f"line {n + 1}: step must be an integer"),
                          ('{"step": 5, "loss": "low"}', f"line {n + 1}: loss must be a number")):
        metrics.write_text(good + garbage + "\n" + good)
        message = one_line_error(run("report", bad, code=2), metrics)
        assert what in message


# ---- data ----------------------------------------------------------------------------------------


def test_bad_data_files_are_exit_2_naming_the_file_and_row(make_recipe, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["the quick brown fox"] * 20}), good)
    corrupt, random_bytes, wrong = tmp_path / "corrupt.parquet", tmp_path / "random.parquet", tmp_path / "wrong.parquet"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    random_bytes.write_bytes(os.urandom(3000))
    pq.write_table(pa.table({"foo": [1, 2], "bar": ["a", "b"]}), wrong)
    deep_jsonl, deep_json = tmp_path / "deep.jsonl", tmp_path / "deep.json"
    row = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    deep_jsonl.write_text('{"messages": []}\n' + row + "\n")
    deep_json.write_text("[" + row + "]")
    cases = [(corrupt, "text", "not a Parquet file"), (random_bytes, "text", "not a Parquet file"),
             (wrong, "text", "row 1: missing field 'text'"), (deep_jsonl, "chat", "row 2: invalid JSON: nested more"),
             (deep_json, "chat", "invalid JSON: nested more")]
    for path, fmt, what in cases:
        recipe = make_recipe(data={"train": str(path), "format": fmt})
        r = run("data", recipe, "--stats", code=2)
        assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr
        assert f"{path}" in r.stderr and what in r.stderr, r.stderr
        r = run("train", recipe, code=2)
        assert f"{path}" in r.stderr and what in r.stderr
        if path.suffix == ".parquet" and what.startswith("not"):  # its footer is read by validate too
            r = run("validate", recipe, code=2)
            assert f"{path}" in r.stderr and what in r.stderr
    assert not (tmp_path / "run").exists()


def test_json_depth_is_checked_before_parsing():
    from peftctl.userfiles import MAX_JSON_DEPTH, json_depth_exceeds, loads

    assert not json_depth_exceeds("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert json_depth_exceeds("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    # brackets inside strings (escaped quotes included) are text, not nesting
    text = json.dumps({"a": "[" * 500 + '"\\' + "{" * 500})
    assert not json_depth_exceeds(text) and loads(text)["a"].startswith("[[[")
    with pytest.raises(ValueError, match="nested more than 100 levels"):
        loads('{"x": ' + "[" * 10**6 + "]" * 10**6 + "}")


# ---- output paths --------------------------------------------------------------------------------


def _commands(trained, out: Path):
    recipe, run_dir = trained
    return {
        "merge": ["merge", run_dir, "-o", out],
        "export-peft": ["export", run_dir, "--format", "peft", "-o", out],
        "export-merged": ["export", run_dir, "--format", "merged", "-o", out],
        "train": ["train", recipe, "--set", f"output.dir={out}"],
        "train-resume-auto": ["train", recipe, "--set", f"output.dir={out}", "--resume", "auto"],
        "prepare": ["prepare", recipe, "--set", f"data.cache_dir={out}"],
    }


def test_output_below_a_file_or_a_dangling_link_is_exit_2_naming_it(trained, tmp_path):
    (tmp_path / "a_file").write_text("keep")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = tree(tmp_path)
    for out, culprit in ((tmp_path / "a_file" / "sub", tmp_path / "a_file"),
                         (tmp_path / "dangling", tmp_path / "nowhere"),
                         (tmp_path / "dangling" / "sub", tmp_path / "nowhere"),
                         (tmp_path / "a_file", tmp_path / "a_file")):
        for name, args in _commands(trained, out).items():
            r = run(*args, code=2)
            one_line_error(r, culprit)
            assert not any(x.startswith("loading") for x in r.stderr.splitlines()), name  # checked first
            assert tree(tmp_path) == before, name


@pytest.mark.parametrize("name", ["merge", "export-peft", "train", "prepare"])
def test_output_that_is_a_link_to_an_empty_folder_is_that_folder(trained, tmp_path, name):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    run(*_commands(trained, link)[name])
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert any(target.iterdir())
    # a link to a folder that holds something is refused like the folder
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep")
    (tmp_path / "busy_link").symlink_to(tmp_path / "busy")
    if name != "prepare":  # a cache folder is meant to be shared
        run(*_commands(trained, tmp_path / "busy_link")[name], code=2)
        assert [p.name for p in (tmp_path / "busy").iterdir()] == ["precious.txt"]


def _killed_mid_build(parent: Path, name: str) -> Path:
    """Start a process that builds `name` in `parent` through fsio.temp_dir and is SIGKILLed halfway;
    returns the temporary folder it left."""
    code = ("import os, signal, sys\nfrom peftctl.fsio import temp_dir\n"
            "tmp = temp_dir(sys.argv[1], sys.argv[2])\n(tmp / 'half.bin').write_bytes(b'x' * 100)\n"
            "print(tmp, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", code, str(parent), name], capture_output=True, text=True, env=env)
    assert p.returncode == -signal.SIGKILL
    left = Path(p.stdout.strip())
    assert left.is_dir() and left.parent == parent and left.name.startswith(f".{name}.")
    return left


def test_temporaries_of_killed_processes_are_removed_by_the_next_run(trained, tmp_path):
    from peftctl.fsio import temp_dir

    out = tmp_path / "out"
    stale = [_killed_mid_build(tmp_path, "out"), _killed_mid_build(tmp_path, "other")]
    # Not ours, or a live process's: never touched.
    foreign = tmp_path / ".out.abc123.tmp"
    foreign.mkdir()
    live = temp_dir(tmp_path, "busy")
    run(*_commands(trained, out)["merge"])
    assert not any(p.exists() for p in stale) and foreign.is_dir() and live.is_dir()
    shutil.rmtree(out)
    stale = _killed_mid_build(tmp_path, "out")
    run(*_commands(trained, out)["export-peft"])
    assert not stale.exists() and (out / "adapter_model.safetensors").is_file()
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = _killed_mid_build(cache, "0123abcd")
    run(*_commands(trained, cache)["prepare"])
    assert not stale.exists() and any(p.name != stale.name for p in cache.iterdir())


def test_reading_blames_the_file_but_not_for_the_machines_limits(tmp_path):
    import torch

    from peftctl.userfiles import BadFileError, reading

    with pytest.raises(BadFileError, match=r"x\.bin: not a thing \(boom\)"), reading(tmp_path / "x.bin", "a thing"):
        raise RuntimeError("boom")
    with pytest.raises(torch.OutOfMemoryError), reading(tmp_path / "x.bin", "a thing"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(MemoryError), reading(tmp_path / "x.bin", "a thing"):
        raise MemoryError()


def test_atomic_dir_one_rule_for_a_folder_already_there(tmp_path):
    """fsio.atomic_dir, the one folder builder (outputs, checkpoints, model and data caches): what
    happens when the final name holds a folder at the end of the build, and that a failed build
    leaves nothing."""
    from peftctl.errors import InputError
    from peftctl.fsio import atomic_dir

    def build(path, content, **kw):
        with atomic_dir(path, **kw) as tmp:
            (tmp / "done").write_text(content)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x").write_text(content)

    def leftovers():
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))

    out = tmp_path / "out"
    build(out, "1")
    assert (out / "sub" / "x").read_text() == "1" and oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(InputError, match="not empty"):  # a user's output: refused, before any work
        build(out, "2")
    assert (out / "done").read_text() == "1"
    # Something written under the final name while the build ran: still refused, and kept.
    with pytest.raises(InputError, match="not empty"), atomic_dir(tmp_path / "late") as tmp:
        (tmp / "done").write_text("mine")
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "theirs").write_text("theirs")
    assert [p.name for p in (tmp_path / "late").iterdir()] == ["theirs"]
    build(out, "3", exists="replace")  # a checkpoint of the same step again
    assert (out / "done").read_text() == "3" and leftovers() == []  # the old one swapped out and removed
    # A cache entry: a finished one (holding `done`) is another process's and kept; an unfinished one replaced.
    with atomic_dir(out, exists="keep", done="done") as tmp:
        (tmp / "done").write_text("4")
    assert (out / "done").read_text() == "3"
    (out / "done").unlink()
    build(out, "5", exists="keep", done="done")
    assert (out / "done").read_text() == "5" and (out / "sub" / "x").read_text() == "5"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the build failed")
    assert not (tmp_path / "failed").exists() and leftovers() == []


def _umask() -> int:
    from peftctl.fsio import umask

    return umask()


def test_a_temporary_file_of_a_killed_process_goes_by_the_folders_rule(tmp_path):
    """atomic_file's temporary, left by a process killed while writing, is named as temp_dir's folders
    are and removed by the next temp_dir in that folder; a live process's is kept."""
    from peftctl.fsio import atomic_file, temp_dir

    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom peftctl.fsio import atomic_file\n"
            "with atomic_file(Path(sys.argv[1]) / 'summary.json') as tmp:\n"
            "    tmp.write_text('half')\n    print(tmp, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    left = Path(p.stdout.strip())
    assert left.is_file() and left.parent == tmp_path and left.name.startswith(".summary.json.")
    with atomic_file(tmp_path / "mine.json") as live:
        live.write_text("{}")
        temp_dir(tmp_path, "out")
        assert not left.exists() and live.exists()
    assert (tmp_path / "mine.json").read_text() == "{}"
