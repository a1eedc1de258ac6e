"""A new user's first hour (issue 15): names from other tools, their configs translated, data
checked by `validate`, chat-data conventions, small things, and Weights & Biases. End to end
through the CLI on the tiny model."""

from __future__ import annotations

import json
import re
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
wandb_project: firsthour
wandb_entity:
wandb_mode: offline
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
report_to: wandb
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
        "tracking": {"wandb": True, "wandb_project": "firsthour", "wandb_mode": "offline"},
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
    assert lf["tracking"] == {"wandb": True}
    assert "dropped max_samples: no equivalent in peftctl" in res.stderr
    assert "dropped plot_loss: peftctl report draws the curves" in res.stderr
    Path("lf-recipe.yaml").write_text(res.stdout)
    run("validate", "lf-recipe.yaml")
    # max_steps with num_train_epochs: max_steps wins, as in transformers' Trainer (it was refused).
    (tmp_path / "lf-steps.yaml").write_text(LLAMAFACTORY.format(model=tiny_model_dir) + "max_steps: 7\n")
    both = run_json("recipe", "from-llamafactory", "lf-steps.yaml")
    assert both["recipe"]["train"]["max_steps"] == 7 and "epochs" not in both["recipe"]["train"]
    assert any(d["key"] == "num_train_epochs" and "overrides" in d["reason"] for d in both["dropped"])


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


def _shown(recipe, *sets) -> list[dict]:
    """`peftctl data --json`: each example's text and the text of its loss tokens."""
    from transformers import AutoTokenizer

    examples = run_json("data", recipe, *sets)["examples"]
    tok = AutoTokenizer.from_pretrained(yaml.safe_load(Path(recipe).read_text())["model"]["name_or_path"])
    return [{"text": ex["text"], "loss": tok.decode([t for t in ex["labels"] if t != -100])} for ex in examples]


def test_chat_weights_names_and_templated_completion_and_alpaca_rows(make_recipe, tmp_path):
    user, bot = {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "weight": 0}
    rows = [{"messages": [user, bot, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2",
                                                                          "weight": 1}]}]
    recipe = make_recipe(data={"train": str(_jsonl(tmp_path / "w.jsonl", rows)), "eval": None})
    (ex,) = _shown(recipe)
    assert ex["loss"] == "A2<|im_end|>\n" and "A1" in ex["text"]  # weight 0: in the text, without loss
    (ex,) = _shown(recipe, "--set", "data.train_on=last")
    assert ex["loss"] == "A2<|im_end|>\n"
    r = run("data", recipe, "--set", "data.train_on=all", code=2)
    assert "w.jsonl row 1: messages[1].weight: 0, and data.train_on: all trains every token" in r.stderr
    for bad, why in ((2, "messages[1].weight must be 0 (no loss on this turn) or 1, got 2"),
                     (None, "messages[0].weight: 1 on a user message: only assistant turns carry loss")):
        msgs = [{**user, "weight": 1}, {**bot, "weight": 1}] if bad is None else [user, {**bot, "weight": bad}]
        _jsonl(tmp_path / "w.jsonl", [{"messages": msgs}])
        assert why in run("validate", recipe, code=2).stderr
    # a message's name: refused where the template ignores it, kept where it writes it
    _jsonl(tmp_path / "w.jsonl", [{"messages": [{**user, "name": "ann"}, {"role": "assistant", "content": "A"}]}])
    assert ("messages[0].name: the chat template ignores this key (it renders the same text without it)"
            in run("validate", recipe, code=2).stderr)
    named = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}: {{ m.content }}"
             "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    (ex,) = _shown(recipe, "--set", f"data.chat_template={named}")
    assert ex["text"] == "<|im_start|>user (ann): Q1<|im_end|><|im_start|>assistant: A<|im_end|>"
    assert ex["loss"] == "A<|im_end|>"

    # completion and alpaca rows: plain text without a named template, its turns with one
    completion = _jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4", "system": "S"}])
    plain = _shown(recipe, "--set", f"data.train=[{{path: {completion}, format: completion}}, "
                                    f"{{path: {alpaca}, format: alpaca}}]")
    assert [ex["text"] for ex in plain] == [
        "2+2=4<|im_end|>", "S\n\n### Instruction:\nAdd\n\n### Input:\n2 and 2\n\n### Response:\n4<|im_end|>"]
    templated = _shown(recipe, "--set", f"data.train=[{{path: {completion}, format: completion}}, "
                                        f"{{path: {alpaca}, format: alpaca}}]", "--set", "data.chat_template=chatml")
    assert templated == [
        {"text": "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n", "loss": "4<|im_end|>\n"},
        {"text": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nAdd\n\n2 and 2<|im_end|>\n<|im_start|>assistant\n"
                 "4<|im_end|>\n", "loss": "4<|im_end|>\n"}]


def test_small_things_a_new_user_noticed(make_recipe, tmp_path):
    from safetensors.torch import save_file

    from peftctl.constants import VERSION

    assert run("--version").stdout == f"peftctl {VERSION}\n"
    recipe = make_recipe(out=str(tmp_path / "run"), train={"max_steps": 4, "save_every": 2})
    # every distinct name an adapter could wrap, and what a string means
    r = run("inspect", recipe, "--set", "adapter.target_modules=q_porj", code=2)
    assert ("target_modules 'q_porj' matches no module of this model (a string is one regular expression over "
            "whole dotted names, such as 'model.layers.0.self_attn.q_proj'); the names of the modules that can be "
            "targeted here: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
            in r.stderr)
    out = run("inspect", recipe, "--memory").stdout
    assert "This is accelerator (GPU) memory" in out and "resident memory (RSS) is higher" in out

    # a resumed dry run: the checkpoints it writes from where it starts, and the recipe's changes
    trained = run_json("train", recipe)
    assert trained["steps"] == 4
    more = ("--set", "train.max_steps=9", "--set", "train.log_every=3")
    plan = run_json("train", recipe, "--resume", "auto", "--dry-run", *more)
    assert plan["resume_from"].endswith("step-000004") and plan["steps"] == 9
    assert plan["checkpoints"] == 3  # steps 6, 8 and 9 (the formula counted 5: ceil(9 / 2))
    assert plan["resume_changes"] == ["train.log_every: 2 -> 3", "train.max_steps: 4 -> 9"]
    text = run("train", recipe, "--resume", "auto", "--dry-run", *more).stdout
    assert "changes      train.log_every: 2 -> 3; train.max_steps: 4 -> 9" in text
    assert plan["checkpoints_kept"] == 2 and "3, the last 2 kept" in text  # train.keep_checkpoints: 2

    # floats rounded for people (the model card, inspect), every digit kept in the run's files
    loss = json.loads((tmp_path / "run/summary.json").read_text())["train_loss"]
    run("export", tmp_path / "run", "-o", tmp_path / "share")
    card = (tmp_path / "share/README.md").read_text()
    assert f"- train_loss: {float(f'{loss:.4g}')}\n" in card and str(loss) not in card
    assert f"train loss {loss:.4g}" in run("inspect", tmp_path / "run").stdout

    # inspect sorts layers naturally: layers.2 before layers.10
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "x"}))
    import torch

    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.zeros(2, 2)
               for i in (10, 2, 1) for ab in "AB"}, folder / "adapter_model.safetensors")
    names = [m["module"] for m in run_json("inspect", folder)["modules"]]
    assert [n.split(".")[2] for n in names] == ["1", "2", "10"]


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows (step and values) an offline W&B run file holds, read with wandb's own reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    # The file is LevelDB's log format behind W&B's 7-byte header (":W&B", magic 0xBEE1, version 0):
    # 32 KiB blocks of records, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    # 4 last) and its bytes; a block's tail shorter than a header is zero padding.
    raw = run_file.read_bytes()
    assert raw[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, block, pieces, records = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pieces += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pieces)
            pieces = b""
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    return rows


def test_weights_and_biases_offline_files_and_a_resumed_run_continues_its_id(make_recipe, tmp_path, monkeypatch):
    import importlib.util

    import pytest

    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 4, "log_every": 2, "eval_every": 2, "save_every": 2},
                         tracking={"wandb": True, "wandb_project": "firsthour"})
    if importlib.util.find_spec("wandb") is None:
        r = run("train", recipe, code=2)
        assert "tracking.wandb is true but the wandb package is not installed; pip install wandb" in r.stderr
        pytest.skip("wandb not installed (pip install -e '.[test]' brings it)")
    # no API key (none in the environment, no ~/.netrc): offline, whatever the network; nothing in $HOME
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    first = run("train", recipe, "--json", "--set", "train.max_steps=4")
    s = json.loads(first.stdout)  # --json: still one object on stdout
    assert s["wandb"]["mode"] == "offline" and "wandb: offline (no W&B API key" in first.stderr
    run_id = s["wandb"]["run_id"]
    (one,) = (out / "wandb").glob("offline-run-*")
    assert one.name.endswith(f"-{run_id}") and str(one) == s["wandb"]["dir"]
    logged = _wandb_history(one / f"run-{run_id}.wandb")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert [(r["_step"], r["train/loss"]) for r in logged if "train/loss" in r] == [
        (st, pytest.approx(v)) for st, v in losses]
    assert [r["eval/loss"] for r in logged if "eval/loss" in r] == pytest.approx(
        [m["eval_loss"] for m in metrics if "eval_loss" in m])

    # resumed: the same W&B run id, its steps going on from the checkpoint
    again = run_json("train", recipe, "--resume", "auto", "--set", "train.max_steps=6")
    assert again["wandb"]["run_id"] == run_id
    two = Path(again["wandb"]["dir"])
    # (a resume within the same second as the first run gets wandb's "-1" suffix on the folder)
    assert two != one and re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", two.name), two.name
    assert [r["_step"] for r in _wandb_history(two / f"run-{run_id}.wandb") if "train/loss" in r] == [6]


LLAMAFACTORY_DPO = """\
model_name_or_path: {model}
stage: dpo
do_train: true
finetuning_type: lora
lora_target: q_proj,v_proj
pref_beta: 2.0
pref_loss: simpo
simpo_gamma: 0.3
pref_ftx: 0.5
dataset: pairs_alpaca,pairs_sharegpt,plain
template: chatml
cutoff_len: 128
output_dir: saves/dpo
per_device_train_batch_size: 2
max_steps: 1
"""


def test_preference_configs_of_llamafactory_and_axolotl_become_preference_recipes(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    """LLaMA-Factory's stage: dpo (pref_loss sigmoid / ipo / orpo / simpo, pref_beta, simpo_gamma,
    pref_ftx, dpo_label_smoothing) and its ranking datasets (alpaca: prompt strings, rendered as
    turns of the recipe's template, as LLaMA-Factory's template does; sharegpt: a message list and
    one chosen and one rejected message), and axolotl's rl with chat_template.default pairs, become
    preference recipes that validate and train; losses peftctl does not have are refused, exit 2."""

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/pairs.jsonl").write_text("".join(json.dumps(
        {"instruction": f"Convert May {d}, 2001 to ISO", "chosen": f"2001-05-{d:02d}", "rejected": f"2001-{d:02d}-05"})
        + "\n" for d in range(1, 5)))
    (tmp_path / "data/pairs_sg.jsonl").write_text("".join(json.dumps(
        {"conversations": [{"from": "human", "value": f"Convert June {d}, 2002 to ISO"}],
         "chosen": {"from": "gpt", "value": f"2002-06-{d:02d}"}, "rejected": {"from": "gpt", "value": "no"}})
        + "\n" for d in range(1, 5)))
    (tmp_path / "data/alpaca.jsonl").write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    (tmp_path / "data/dataset_info.json").write_text(json.dumps({
        "pairs_alpaca": {"file_name": "pairs.jsonl", "ranking": True,
                         "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
        "pairs_sharegpt": {"file_name": "pairs_sg.jsonl", "formatting": "sharegpt", "ranking": True,
                           "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "plain": {"file_name": "alpaca.jsonl"}}))
    (tmp_path / "lf.yaml").write_text(LLAMAFACTORY_DPO.format(model=tiny_model_dir))
    out = run_json("recipe", "from-llamafactory", "lf.yaml", "-o", "lf-dpo.yaml")
    r = out["recipe"]
    assert r["train"] == {"objective": "simpo", "beta": 2.0, "simpo_gamma": 0.3, "cpo_alpha": 0.5, "batch_size": 2,
                          "max_steps": 1}
    assert r["data"] == {"train": [
        {"path": "data/pairs.jsonl", "format": "preference", "columns": {"prompt": "instruction"}},
        {"path": "data/pairs_sg.jsonl", "format": "preference",
         "columns": {"prompt": "conversations", "role": "from", "content": "value"},
         "roles": {"human": "user", "gpt": "assistant"}}], "chat_template": "chatml", "max_length": 128}
    dropped = {d["key"]: d["reason"] for d in out["dropped"]}
    assert dropped["dataset: plain"] == "stage: dpo trains on ranking (preference) datasets only"
    assert any(n.startswith("pref_ftx: 0.5 is train.cpo_alpha") for n in out["notes"])
    assert "# Note: pref_ftx: 0.5 is train.cpo_alpha" in Path("lf-dpo.yaml").read_text()
    run("validate", "lf-dpo.yaml")
    # The prompt strings are a user turn of the template, as the message lists are.
    shown = run("data", "lf-dpo.yaml", "--show", "8")
    shown = shown.stdout + shown.stderr
    assert "<|im_start|>user\nConvert May 1, 2001 to ISO<|im_end|>" in shown
    assert "<|im_start|>user\nConvert June 1, 2002 to ISO<|im_end|>" in shown
    run("train", "lf-dpo.yaml")
    records = [json.loads(line) for line in Path("saves/dpo/metrics.jsonl").read_text().splitlines()]
    assert "rewards/margins" in records[0] and records[0]["pairs"] == 2

    def translated(text: str, code: int = 0):
        (tmp_path / "x.yaml").write_text(text)
        return run_json("recipe", "from-llamafactory", "x.yaml", code=code)

    base = LLAMAFACTORY_DPO.format(model=tiny_model_dir)
    dpo = translated(base.replace("pref_loss: simpo", "pref_loss: sigmoid").replace("pref_ftx: 0.5", "pref_ftx: 0")
                     + "dpo_label_smoothing: 0.2\nadapter_name_or_path: data\n")
    assert dpo["recipe"]["train"] | {"init_adapter": None} == {
        "objective": "dpo", "beta": 2.0, "label_smoothing": 0.2, "precompute_ref_log_probs": True, "batch_size": 2,
        "max_steps": 1, "init_adapter": None}
    assert {d["key"] for d in dpo["dropped"]} >= {"simpo_gamma"}
    assert any("the reference is the model with that adapter" in n for n in dpo["notes"])
    orpo = translated(base.replace("pref_loss: simpo", "pref_loss: orpo").replace("pref_ftx: 0.5", "pref_ftx: 0"))
    assert orpo["recipe"]["train"]["objective"] == "orpo"
    # Refused, naming the option: a loss peftctl has not, another stage, pref_ftx where no NLL weight
    # takes it (orpo's is 1 here, LLaMA-Factory's 1 + pref_ftx; dpo's is rpo_alpha where the schema has it).
    assert translated(base.replace("pref_loss: simpo", "pref_loss: sigmoid"))["recipe"]["train"]["rpo_alpha"] == 0.5
    for old, new, key in (("pref_loss: simpo", "pref_loss: hinge", "pref_loss"), ("stage: dpo", "stage: ppo", "stage"),
                          ("pref_loss: simpo", "pref_loss: orpo", "pref_ftx")):
        errors = translated(base.replace(old, new), code=2)["errors"]
        assert errors[0]["message"].startswith(f"{key}: "), (new, errors)

    (tmp_path / "data/ax_pairs.jsonl").write_text((tmp_path / "data/pairs_sg.jsonl").read_text())
    (tmp_path / "ax.yml").write_text(f"""\
base_model: {tiny_model_dir}
adapter: lora
lora_r: 4
rl: simpo
rl_beta: 2.5
datasets:
  - path: data/ax_pairs.jsonl
    type: chat_template.default
    field_messages: conversations
    message_property_mappings: {{role: from, content: value}}
    roles: {{user: [human], assistant: [gpt]}}
  - path: data/alpaca.jsonl
    type: alpaca
output_dir: ./out-ax
""")
    ax = run_json("recipe", "from-axolotl", "ax.yml", "-o", "ax.yaml")
    assert ax["recipe"]["train"] == {"objective": "simpo", "cpo_alpha": 1.0, "beta": 2.5}
    assert ax["recipe"]["data"]["train"] == [
        {"path": "data/ax_pairs.jsonl", "format": "preference",
         "columns": {"prompt": "conversations", "role": "from", "content": "value"},
         "roles": {"human": "user", "gpt": "assistant"}}]
    run("validate", "ax.yaml")
    text = (tmp_path / "ax.yml").read_text()
    (tmp_path / "ax.yml").write_text(text.replace("rl: simpo", "rl: kto"))
    assert run_json("recipe", "from-axolotl", "ax.yml", code=2)["errors"][0]["message"].startswith("rl: kto")
    (tmp_path / "ax.yml").write_text(text.replace("rl: simpo", "rl: dpo\nrpo_alpha: 0.5"))
    assert run_json("recipe", "from-axolotl", "ax.yml")["recipe"]["train"]["rpo_alpha"] == 0.5  # TRL's RPO weight
    # axolotl hands orpo_alpha to TRL's ORPO beta when rl_beta is unset (it was dropped)
    (tmp_path / "ax.yml").write_text(text.replace("rl: simpo\nrl_beta: 2.5", "rl: orpo\norpo_alpha: 0.3"))
    assert run_json("recipe", "from-axolotl", "ax.yml")["recipe"]["train"]["beta"] == 0.3
