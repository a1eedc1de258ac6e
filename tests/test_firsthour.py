"""A new user's first hour (issue 15): names from other tools, their configs translated, data
checked by `validate`, chat-data conventions, small things, and Weights & Biases. End to end
through the CLI on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from clirun import run, run_json


def _errors(*args) -> list[str]:
    out = run_json(*args, code=2)
    return [f"{e['path']}: {e['message']}" for e in out["errors"]]


def test_names_from_transformers_axolotl_and_llamafactory_point_at_the_field_and_its_section(make_recipe):
    recipe = make_recipe()
    text = recipe.read_text()
    recipe.write_text(text + "learning_rate: 1.0e-4\nbf16: true\nlr: 3\n")
    got = _errors("validate", recipe, "--set", "train.per_device_train_batch_size=2", "--set", "adapter.lora_r=4",
                  "--set", "data.cutoff_len=64", "--set", "train.gradient_acumulation_steps=2",
                  "--set", "train.max_stpes=3", "--set", "model.sequence_len=64")
    assert sorted(got) == sorted([
        "learning_rate: unknown field; did you mean 'lr' in section train (train.lr)? (learning_rate is "
        "transformers', axolotl's and LLaMA-Factory's name for it)",
        "bf16: unknown field; did you mean model.dtype: bfloat16? (bf16 is another tool's name: peftctl's is "
        "'dtype' in section model (model.dtype))",
        "lr: unknown field; did you mean train.lr? (lr is a field of section train)",
        "train.per_device_train_batch_size: unknown field; did you mean 'batch_size'? (per_device_train_batch_size "
        "is transformers' and LLaMA-Factory's name for it)",
        "adapter.lora_r: unknown field; did you mean 'r'? (lora_r is axolotl's name for it)",
        "data.cutoff_len: unknown field; did you mean 'max_length'? (cutoff_len is LLaMA-Factory's name for it)",
        "train.gradient_acumulation_steps: unknown field; did you mean 'grad_accum'? (gradient_acumulation_steps "
        "looks like gradient_accumulation_steps)",
        "train.max_stpes: unknown field; did you mean 'max_steps'?",
        "model.sequence_len: unknown field; did you mean 'max_length' in section data (data.max_length)? "
        "(sequence_len is axolotl's name for it)",
    ])


AXOLOTL = """\
base_model: {model}
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
  - path: data/chat.jsonl
    type: chat_template
    field_messages: dialog
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 256
sample_packing: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_linear: true
wandb_project:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 3
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
warmup_ratio: 0.1
evals_per_epoch: 4
special_tokens:
  pad_token: "<|end_of_text|>"
"""

LLAMAFACTORY = """\
### model
model_name_or_path: {model}
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: q_proj,v_proj
### dataset
dataset: my_alpaca,my_chat
template: llama3
cutoff_len: 128
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_axolotl_and_llamafactory_configs_become_recipes_that_validate(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/alpaca.jsonl").write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "data/chat.jsonl").write_text(json.dumps({"dialog": dialog}) + "\n")
    (tmp_path / "ax.yml").write_text(AXOLOTL.format(model=tiny_model_dir))
    out = run_json("recipe", "from-axolotl", "ax.yml", "-o", "recipes/ax.yaml")
    r = yaml.safe_load(Path("recipes/ax.yaml").read_text())
    assert r == out["recipe"] == {
        "model": {"name_or_path": str(tiny_model_dir), "quantization": {"bits": 4, "quant_type": "nf4"},
                  "dtype": "bfloat16"},
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": [{"path": "../data/alpaca.jsonl", "format": "alpaca"},
                           {"path": "../data/chat.jsonl", "format": "chat", "columns": {"messages": "dialog"}}],
                 "cache_dir": "../last_run_prepared", "eval_split": 0.1, "max_length": 256, "packing": True,
                 "train_on": "assistant"},
        "train": {"grad_accum": 4, "batch_size": 2, "epochs": 3, "optimizer": "adamw_8bit", "scheduler": "cosine",
                  "lr": 0.0002, "gradient_checkpointing": True, "log_every": 1, "warmup_ratio": 0.1},
        "output": {"dir": "../outputs/qlora-out"},
    }
    dropped = {d["key"]: d["reason"] for d in out["dropped"]}
    assert set(dropped) == {"model_type", "tokenizer_type", "strict", "tf32", "evals_per_epoch", "special_tokens"}
    assert dropped["model_type"] == "the model class is read from its config.json"
    assert "# Dropped" in Path("recipes/ax.yaml").read_text()  # the file says so too
    run("validate", "recipes/ax.yaml")
    run("recipe", "from-axolotl", "ax.yml", "-o", "recipes/ax.yaml", code=2)  # never overwritten

    (tmp_path / "data/dataset_info.json").write_text(json.dumps({
        "my_alpaca": {"file_name": "alpaca.jsonl"},
        "my_chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"}}}))
    (tmp_path / "lf.yaml").write_text(LLAMAFACTORY.format(model=tiny_model_dir))
    res = run("recipe", "from-llamafactory", "lf.yaml")  # printed: the recipe on stdout, what was dropped on stderr
    lf = yaml.safe_load(res.stdout)
    assert lf["adapter"] == {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert lf["data"] == {"train": [{"path": "data/alpaca.jsonl", "format": "alpaca"},
                                    {"path": "data/chat.jsonl", "format": "chat", "columns": {"messages": "dialog"}}],
                          "chat_template": "llama3", "max_length": 128, "eval_split": 0.1}
    assert lf["train"] == {"log_every": 10, "save_every": 500, "batch_size": 1, "grad_accum": 8, "lr": 1.0e-4,
                           "epochs": 3.0, "scheduler": "cosine", "warmup_ratio": 0.1, "eval_every": 500}
    assert lf["model"] == {"name_or_path": str(tiny_model_dir), "trust_remote_code": True, "dtype": "bfloat16"}
    assert "dropped max_samples: no equivalent in peftctl" in res.stderr
    assert "dropped plot_loss: peftctl report draws the curves" in res.stderr
    Path("lf-recipe.yaml").write_text(res.stdout)
    run("validate", "lf-recipe.yaml")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_validate_parses_every_row_in_the_recipes_format(make_recipe, tmp_path):
    recipe = make_recipe()
    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                       {"from": "gpt", "value": "yo"}]}])
    assert _errors("validate", recipe, "--set", f"data.train={sharegpt}") == [
        f"data.train: {sharegpt} row 1: missing field 'messages' (the row's keys: 'conversations'); rows have "
        "\"conversations\" with \"from\"/\"value\": did you mean format: sharegpt?; name other columns in "
        "data.columns (format: chat)"]
    run("validate", recipe, "--set", f"data.train={sharegpt}", "--set", f"data.eval={sharegpt}",
        "--set", "data.format=sharegpt")
    broken = _jsonl(tmp_path / "broken.jsonl", [*good, '{"messages": [}'])
    r = run("validate", recipe, "--set", f"data.eval={broken}", code=2)
    assert f"data.eval: {broken} row 4: invalid JSON: Expecting value (column 15)" in r.stderr
    bad_role = _jsonl(tmp_path / "role.jsonl", [*good, {"messages": [{"role": "bot", "content": "x"}]}])
    assert _errors("validate", recipe, "--set", f"data.train={bad_role}") == [
        f"data.train: {bad_role} row 4: messages[0].role: unknown role 'bot'; known: system, user, assistant, tool "
        "(map other names with data.roles, e.g. {human: user, gpt: assistant}) (format: chat)"]
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert _errors("validate", recipe, "--set", f"data.train={qa}", "--set", "data.format=completion",
                   "--set", "data.eval=null") == [
        f"data.train: {qa} row 1: missing field 'prompt' (the row's keys: 'question', 'answer'); name other "
        "columns in data.columns (format: completion)"]
    run("validate", recipe, "--set", f"data.train={qa}", "--set", "data.format=completion", "--set", "data.eval=null",
        "--set", "data.columns={prompt: question, completion: answer}")
    # streamed, every row; --quick reads the first 1,000 of each source
    late = _jsonl(tmp_path / "late.jsonl", [{"text": f"row {i}"} for i in range(1000)] + [{"txt": "late"}])
    text = ("--set", f"data.train={late}", "--set", "data.format=text", "--set", "data.eval=null")
    assert run_json("validate", recipe, *text, "--quick")["valid"] is True
    assert _errors("validate", recipe, *text)[0].startswith(
        f"data.train: {late} row 1001: missing field 'text' (the row's keys: 'txt')")


def test_a_set_list_written_with_commas_is_explained(make_recipe):
    r = run_json("validate", make_recipe(), "--set", "adapter.target_modules=q_proj,v_proj", code=2)
    assert r["errors"] == [{
        "source": "--set adapter.target_modules=q_proj,v_proj", "line": None, "path": "adapter.target_modules",
        "message": "'q_proj,v_proj' is one string, not a list (a string here is one regular expression matching "
                   "whole module names, and no module is named 'q_proj,v_proj'); write a list: "
                   "--set 'adapter.target_modules=[q_proj, v_proj]'"}]
    run("validate", make_recipe(), "--set", "adapter.target_modules=[q_proj, v_proj]")
    run("validate", make_recipe(), "--set", "adapter.target_modules=.*(q|v)_proj")  # a regex stays one
