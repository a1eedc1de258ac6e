"""Prompt tuning, P-tuning and prefix tuning through the CLI on the tiny model: validate, dry run,
train, eval (loss and exact match, which generates), inspect, export --format peft (PEFT loads it
and gives the run's logits), resume (bit for bit, P-tuning's encoder included), two processes equal
to one; the same on a tiny T5 (model.task seq2seq_lm); and the refusals (merge, packing, prefix
tuning with gradient checkpointing, model.task seq_cls / token_cls) as exit 2 with the reason."""

from __future__ import annotations

import math

import pytest
import torch
from clirun import gloo_env, run, run_json
from safetensors.torch import load_file
from tiny import recipe_text, write_chat_data

PROMPT = {"method": "prompt_tuning", "num_virtual_tokens": 6, "prompt_tuning_init": "TEXT",
          "prompt_tuning_init_text": "Convert to ISO"}
PTUNING = {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
           "encoder_hidden_size": 16}
PREFIX = {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True}


def _recipe(folder, tiny_model_dir, chat_data, name, adapter, **train):
    path = folder / f"{name}.yaml"
    held_out = write_chat_data(folder / "eval.jsonl", 4, seed=2)  # few answers to generate: a fast test
    path.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(held_out), name, adapter=adapter,
                                train={"max_steps": 2, "save_every": 1, "lr": 0.05, **train}))
    return path


def test_prompt_tuning_end_to_end(tmp_path, tiny_model_dir, chat_data):
    recipe = _recipe(tmp_path, tiny_model_dir, chat_data, "pt", PROMPT)
    run("validate", recipe)
    plan = run_json("train", recipe, "--dry-run")
    assert plan["trainable_params"] == 6 * 64 and plan["virtual_tokens"] == 6
    assert "prompt_tuning 6 virtual tokens" in run("train", recipe, "--dry-run").stdout  # not "on 0 modules"
    assert "6 virtual tokens before every sequence" in run("inspect", recipe).stdout  # not an empty table
    summary = run_json("train", recipe)
    assert summary["status"] == "completed" and summary["steps"] == 2
    out = tmp_path / "pt"
    saved = load_file(out / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (6, 64)

    result = run_json("eval", recipe)
    assert result["exact_match_n"] == 4 and 0 <= result["exact_match"] <= 1
    assert result["eval_loss"] == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-5)
    info = run_json("inspect", out)
    assert info["peft_type"] == "PROMPT_TUNING"

    # The exported adapter is PEFT's: PEFT loads it and gives peftctl's logits.
    run("export", out, "--format", "peft", "-o", tmp_path / "share")
    peft = pytest.importorskip("peft", reason="peft is the reference for the exported file")
    from transformers import AutoModelForCausalLM

    from peftctl import PeftModel

    ids = torch.tensor([[5, 17, 30, 41]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "share")
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-6)

    # Resuming from the middle checkpoint ends where the uninterrupted run ended, bit for bit.
    run("train", recipe, "--resume", out / "checkpoints" / "step-000001")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], saved["prompt_embeddings"])

    r = run("merge", out, "-o", tmp_path / "merged", code=2)
    assert "cannot be merged" in r.stderr and not (tmp_path / "merged").exists()
    r = run("train", recipe, "--dry-run", "--set", "data.packing=true", "--set", "output.dir=other", code=2)
    assert "data.packing" in r.stderr and "set data.packing: false" in r.stderr


def test_ptuning_trains_through_its_encoder_and_resumes_exactly(tmp_path, tiny_model_dir, chat_data):
    recipe = _recipe(tmp_path, tiny_model_dir, chat_data, "pt", PTUNING, gradient_checkpointing=True)
    # The memory estimate counts the trainable state as the screen counts the trainable params: the
    # virtual tokens and the LSTM encoder, float32 (4 bytes), gradients alike, AdamW's two moments.
    plan = run_json("train", recipe, "--dry-run")
    mem, n = plan["memory_estimate_bytes"], plan["trainable_params"]
    assert n > 4 * 64  # the encoder's parameters besides the 4 x 64 tokens
    assert mem["adapter_weights"] == mem["gradients"] == 4 * n and mem["optimizer_states"] == 8 * n
    run_json("train", recipe)
    out = tmp_path / "pt"
    saved = load_file(out / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 64)
    # The run folder holds no adapted module: its virtual tokens instead of an empty table.
    shown = run("inspect", out).stdout
    assert "4 virtual tokens before every sequence" in shown and "params │" not in shown  # no table
    # A checkpoint also holds the encoder (the file holds only its output): resuming continues it.
    run("train", recipe, "--resume", out / "checkpoints" / "step-000001")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], saved["prompt_embeddings"])


def test_prefix_tuning_trains(tmp_path, tiny_model_dir, chat_data):
    recipe = _recipe(tmp_path, tiny_model_dir, chat_data, "px", PREFIX)
    assert run_json("train", recipe)["status"] == "completed"
    saved = load_file(tmp_path / "px" / "adapter_model.safetensors")
    # Llama's keys and values: 2 key-value heads of 16 = 32 wide, 2 layers, keys and values.
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    r = run("train", recipe, "--dry-run", "--set", "train.gradient_checkpointing=true", code=2)
    assert "prefix tuning" in r.stderr and "gradient_checkpointing: false" in r.stderr
    assert "--set train.gradient_checkpointing=true" in r.stderr  # placed at the flag that set it
    r = run("validate", recipe, "--set", "train.memory_budget=1", code=2)
    assert "--set train.memory_budget=1 train.memory_budget:" in r.stderr
    # The estimate counts the prefix encoder (float32, AdamW) and no checkpointed activations, which
    # prefix tuning refuses.
    info = run_json("inspect", recipe, "--memory")
    mem, n = info["memory"], info["trainable_params"]
    assert mem["adapter_weights"] == mem["gradients"] == 4 * n > 0 and mem["optimizer_states"] == 8 * n
    assert mem["activations_with_checkpointing"] is None and not mem["gradient_checkpointing"]
    shown = run("inspect", recipe, "--memory").stdout
    assert "checkpointing off (this recipe)" in shown and "checkpointing on" not in shown


@pytest.mark.parametrize("adapter", [PTUNING, PREFIX], ids=["p_tuning", "prefix_tuning"])
def test_two_processes_train_as_one_process_does(adapter, tmp_path, tiny_model_dir, chat_data):
    """`--num-processes 2` (accelerate, gloo on CPU), batch 2 on each, is the global batch of 4 in
    one process: the same losses and the same saved adapter (P-tuning's encoder and the projected
    prefix train through DDP; their checkpointed encoders are not compared here).

    Tolerance: every example's forward is the same arithmetic in both runs but for the padding
    (each process pads its 2 rows to their own longest, masked: the softmax and matmul sums run
    over other lengths) and the order of the sums over examples (the gradient's all-reduce mean
    against one backward over 4 rows): float32 rounding, relative ~1e-6 on losses and gradients of
    order 1. Three AdamW steps (lr 1e-2) move each weight by lr * m / sqrt(v), whose relative error
    is the gradient's: ~1e-8 absolute on weights of order 1, bounded at 1e-5 (rel 1e-4 on losses)."""
    import json
    import subprocess
    import sys

    def recipe(name, batch_size):
        return _recipe(tmp_path, tiny_model_dir, chat_data, name, adapter, max_steps=3, batch_size=batch_size,
                       save_every=None, lr=1e-2, scheduler="constant", log_every=1, eval_every=1000)

    two = recipe("two", 2)
    p = subprocess.run([sys.executable, "-m", "peftctl", "train", str(two), "--num-processes", "2", "--json"],
                       env={**gloo_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["num_processes"] == 2
    run("train", recipe("one", 4))

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(losses("one")) == 3 and losses("two") == pytest.approx(losses("one"), rel=1e-4)
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors")["prompt_embeddings"] for name in ("one", "two"))
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


SEQ2SEQ = [PROMPT, PTUNING, PREFIX]


@pytest.mark.parametrize("adapter", SEQ2SEQ, ids=[a["method"] for a in SEQ2SEQ])
def test_seq2seq_trains_evaluates_and_exports_for_peft(adapter, tmp_path):
    """model.task seq2seq_lm on a local tiny T5 folder: the run trains (the loss on one repeated
    batch falls) and resumes exactly, `peftctl eval` reports loss and exact match from its generations (references set
    to PEFT's greedy answers for some rows give exactly that share), and the exported adapter loads
    in PEFT with the run's logits (tolerance: tests/test_tasks.py's, float32 roundings of the same
    operations: 1e-5)."""
    import json

    import yaml
    from peft import PeftModel as TheirPeftModel
    from tiny_tasks import build_t5, write_seq2seq
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from peftctl.adapters import AutoPeftModelForSeq2SeqLM

    model_dir = build_t5(tmp_path / "t5")
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    with torch.no_grad():  # a livelier T5 than its default init (which answers pad tokens only): see tiny_t5
        for p in base.parameters():
            p.mul_(2)
        for stack in (base.encoder, base.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5)
    base.config.dropout_rate = 0.0  # the same batch every step gives the same loss but for the training
    base.save_pretrained(model_dir)
    train, held_out = write_seq2seq(tmp_path / "train.jsonl", 8), write_seq2seq(tmp_path / "eval.jsonl", 4, seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "task": "seq2seq_lm"},
        "adapter": {k: v for k, v in adapter.items() if not k.startswith("prompt_tuning_init")},
        "data": {"train": str(train), "eval": str(held_out), "format": "completion", "max_length": 32},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1, "warmup_steps": 0, "seed": 0,
                  "scheduler": "constant", "save_every": 4},
        "eval": {"batch_size": 4, "max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "run")},
    }, sort_keys=False))
    run("validate", recipe)
    summary = run_json("train", recipe)
    assert summary["status"] == "completed"
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses  # the same 8 rows every step
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_transformer_submodules"] == 2
    saved = load_file(out / "adapter_model.safetensors")["prompt_embeddings"]
    # Resuming from the middle checkpoint ends where the uninterrupted run ended, bit for bit.
    run("train", recipe, "--resume", out / "checkpoints" / "step-000004")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], saved)

    run("export", out, "--format", "peft", "-o", tmp_path / "share")
    theirs = TheirPeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), tmp_path / "share").eval()
    ours = AutoPeftModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    sources = [json.loads(line)["prompt"] for line in held_out.read_text().splitlines()]
    answers = []
    for text in sources:
        ids = tok(text, return_tensors="pt")["input_ids"]
        decoder = torch.zeros((1, 1), dtype=torch.long)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids, decoder_input_ids=decoder).logits,
                                       theirs(input_ids=ids, decoder_input_ids=decoder).logits, atol=1e-5, rtol=0)
            for _ in range(4):  # PEFT's greedy answer, by full forwards (its generate() is not the oracle)
                nxt = theirs(input_ids=ids, decoder_input_ids=decoder).logits[:, -1].argmax(-1, keepdim=True)
                decoder = torch.cat((decoder, nxt), dim=1)
                if int(nxt) == tok.eos_token_id:
                    break
        answers.append(" ".join(tok.decode(decoder[0], skip_special_tokens=True).split()))
    same = [i for i, a in enumerate(answers) if a][:2]
    assert same, answers
    data = [json.loads(line) for line in held_out.read_text().splitlines()]
    for i, row in enumerate(data):
        row["completion"] = answers[i] if i in same else f"not {answers[i]}"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in data))
    result = run_json("eval", recipe)
    assert result["exact_match"] == len(same) / 4 and result["exact_match_n"] == 4
    assert math.isfinite(result["eval_loss"])


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_classification_tasks_are_refused(task, tmp_path):
    """seq_cls and token_cls with a prompt method: exit 2 naming both, before any work (they trained a
    prompt before a frozen, never-saved random head, or failed mid-run)."""
    import yaml
    from tiny_tasks import build_bert, write_classification, write_tagging

    model_dir = build_bert(tmp_path / "bert")
    data = (write_classification if task == "seq_cls" else write_tagging)(tmp_path / "train.jsonl", 8)
    recipe = tmp_path / "recipe.yaml"
    for adapter in (PROMPT, PTUNING, PREFIX):
        recipe.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(model_dir), "task": task}, "adapter": adapter,
            "data": {"train": str(data), "format": "classification" if task == "seq_cls" else "token_classification"},
            "output": {"dir": str(tmp_path / "run")}}))
        for command in ("validate", "train"):
            r = run(command, recipe, code=2)
            assert f"adapter.method {adapter['method']} is not supported with model.task {task}" in r.stderr
    assert not (tmp_path / "run").exists()


def test_fields_the_method_would_ignore_are_refused(tmp_path, tiny_model_dir, chat_data):
    """A prompt-learning field that PEFT would ignore or overwrite is refused (exit 2, naming the
    field) by validate, the dry run and train, not written over or dropped: a token_dim, num_layers
    or num_attention_heads other than the model's (prefix tuning on the tiny Llama, grouped-query:
    token_dim 2 x 16 = 32, where PEFT replaces the given value silently); the init text or tokenizer
    without prompt_tuning_init TEXT (PEFT accepts and ignores them); an MLP P-tuning encoder's
    dropout; a prefix's encoder_hidden_size without prefix_projection; a recipe's
    tokenizer_name_or_path (the run's tokenizer reads the text). A saved PEFT file with the init
    text and RANDOM still loads (PEFT writes such files)."""
    prefix = _recipe(tmp_path, tiny_model_dir, chat_data, "px", PREFIX)
    for flag, words in (("adapter.token_dim=99", "token_dim 99: this model's is 32"),
                        ("adapter.num_layers=3", "num_layers 3: this model's is 2"),
                        ("adapter.num_attention_heads=4", "num_attention_heads 4: this model's is 2")):
        for command in (("validate",), ("train", "--dry-run"), ("train",)):
            r = run(*command, prefix, "--set", flag, code=2)
            assert words in r.stderr and "Traceback" not in r.stderr, (command, flag)
    assert not (tmp_path / "px").exists()  # nothing written
    run("validate", prefix, "--set", "adapter.token_dim=32")  # the model's own value is fine

    text_init = _recipe(tmp_path, tiny_model_dir, chat_data, "pt", PROMPT)
    for init in ("RANDOM", "SAMPLE_VOCAB"):
        r = run("validate", text_init, "--set", f"adapter.prompt_tuning_init={init}", code=2)
        assert "prompt_tuning_init_text is only read with prompt_tuning_init TEXT" in r.stderr
    r = run("validate", text_init, "--set", f"adapter.tokenizer_name_or_path={tiny_model_dir}", code=2)
    assert "adapter.tokenizer_name_or_path" in r.stderr and "run's tokenizer" in r.stderr
    r = run("validate", _recipe(tmp_path, tiny_model_dir, chat_data, "p2", {**PTUNING, "encoder_dropout": 0.1}),
            "--set", "adapter.encoder_reparameterization_type=MLP", code=2)
    assert "encoder_dropout is only used with encoder_reparameterization_type LSTM" in r.stderr
    r = run("validate", prefix, "--set", "adapter.prefix_projection=false", "--set", "adapter.encoder_hidden_size=8",
            code=2)
    assert "encoder_hidden_size is only used with prefix_projection: true" in r.stderr

    from peftctl.adapters.prompt_tuning.config import PromptTuningConfig

    saved = PromptTuningConfig.from_peft_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                               "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": "x",
                                               "tokenizer_name_or_path": "gpt2"})
    assert saved.prompt_tuning_init == "RANDOM"
