"""`peftctl generate`, `peftctl chat` and `peftctl eval --predictions` end to end on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from clirun import run, run_json

PROMPT = "Convert May 3, 1999 to ISO"
NEW = "12"  # --max-new-tokens: short answers keep the tests fast


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, chat_data):
    """A run whose adapter changes the model's answers (lr high enough to move greedy decoding)."""
    from tiny import recipe_text

    folder = tmp_path_factory.mktemp("gen")
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), "run",
                                  train={"max_steps": 20, "lr": 2e-2},
                                  data={"chat_template": "zephyr"}))  # not the base tokenizer's (ChatML)
    run_json("train", recipe)
    return recipe, folder / "run"


def _direct(gen, messages, max_new_tokens: int) -> str:
    """transformers' own rendering (apply_chat_template) and greedy generate on a loaded model."""
    tok = gen.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_is_the_adapter_models_greedy_answer(trained, tiny_model_dir, tmp_path):
    """generate on a run: the answer of transformers' greedy generate on the run's model (adapter on),
    from the prompt rendered by the run's chat template (zephyr, trained with; the base tokenizer's is
    ChatML); --base: the base model's (another) answer to the same prompt; a checkpoint folder and the
    merged folder: the adapter's answer; a plain model folder: its own greedy answer."""
    from peftctl import generate as gen_lib

    _, run_dir = trained
    messages = [{"role": "user", "content": PROMPT}]
    tuned = run_json("generate", run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert tuned["adapter"] == str(run_dir) and tuned["prompt"] == PROMPT
    gen = gen_lib.load(run_dir)
    assert "<|user|>" in gen.tokenizer.apply_chat_template(messages, tokenize=False)
    assert tuned["output"] == _direct(gen, messages, int(NEW))
    assert tuned["new_tokens"] >= 1 and tuned["finish_reason"] in ("stop", "length")

    base = run_json("generate", run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW, "--base")
    assert base["adapter"] is None
    assert base["output"] == _direct(gen_lib.load(run_dir, base=True), messages, int(NEW))
    assert base["output"] != tuned["output"]  # the adapter changes the answer
    plain = run_json("generate", tiny_model_dir, "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert plain["output"] == _direct(gen_lib.load(tiny_model_dir), messages, int(NEW))

    [checkpoint] = (run_dir / "checkpoints").iterdir()  # the last step's: no tokenizer saved there
    assert run_json("generate", checkpoint, "--prompt", PROMPT, "--max-new-tokens", NEW)["output"] == tuned["output"]
    assert gen_lib.load(checkpoint).prompt_ids(PROMPT) == gen.prompt_ids(PROMPT)  # the recipe's template
    run_json("merge", run_dir, "-o", tmp_path / "merged")
    merged = run_json("generate", tmp_path / "merged", "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert merged["output"] == tuned["output"]
    # without --json: the answer alone on stdout
    assert run("generate", run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW).stdout == tuned["output"] + "\n"


def test_generate_input_file(trained, tmp_path):
    """--input: one JSON line per prompt (a string or a conversation so far), in order; --output writes
    the same lines to a file and refuses to replace one; a bad line is exit 2 naming the file and line,
    before any model loads. (The base model, --base: its answers depend on the prompt; the briefly
    trained adapter's barely do.)"""
    from peftctl import generate as gen_lib

    _, run_dir = trained
    conversation = [{"role": "user", "content": "Convert June 9, 2001 to ISO"}, {"role": "assistant", "content": "x"},
                    {"role": "user", "content": PROMPT}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPT) + "\n\n" + json.dumps(conversation) + "\n")
    lines = run("generate", run_dir, "--input", prompts, "--max-new-tokens", NEW, "--base").stdout.splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["line"] for r in rows] == [1, 3] and [r["prompt"] for r in rows] == [PROMPT, conversation]
    gen = gen_lib.load(run_dir, base=True)
    assert [r["output"] for r in rows] == [_direct(gen, [{"role": "user", "content": PROMPT}], int(NEW)),
                                           _direct(gen, conversation, int(NEW))]
    assert rows[0]["output"] != rows[1]["output"]

    out = tmp_path / "answers.jsonl"
    res = run_json("generate", run_dir, "--input", prompts, "--max-new-tokens", NEW, "--base", "-o", out)
    assert res["prompts"] == 2 and [json.loads(x) for x in out.read_text().splitlines()] == rows
    r = run("generate", run_dir, "--input", prompts, "-o", out, code=2)
    assert "exists" in r.stderr and "--overwrite" in r.stderr
    run("generate", run_dir, "--input", prompts, "--max-new-tokens", NEW, "-o", out, "--overwrite")

    bad = tmp_path / "bad.jsonl"
    for text, why in [(json.dumps(PROMPT) + "\n{\"prompt\": 1}\n", "line 2: must be a prompt"),
                      (json.dumps(PROMPT) + "\n[\"hi\"\n", "line 2 is not JSON"),
                      ('[{"role": "user"}]\n', "line 1: messages[0].content must be a string")]:
        bad.write_text(text)
        r = run("generate", run_dir, "--input", bad, "-o", tmp_path / "never.jsonl", code=2)
        assert str(bad) in r.stderr and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "never.jsonl").exists()


def test_chat_piped_with_reset(trained, tmp_path):
    """chat reads turns from stdin: the second answer continues the conversation, /reset forgets it (the
    same first message gets the same answer), /exit ends; end of input ends cleanly too. --system opens
    the conversation. (--base: the base model's answers depend on the prompt.)"""
    _, run_dir = trained
    second = "Convert June 9, 2001 to ISO"
    out = run("chat", run_dir, "--max-new-tokens", NEW, "--base", input=f"{PROMPT}\n{second}\n/reset\n{PROMPT}\n/exit\nnot read\n")
    first = run_json("generate", run_dir, "--prompt", PROMPT, "--max-new-tokens", NEW, "--base")["output"]
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
                {"role": "user", "content": second}]
    prompts = tmp_path / "conversation.jsonl"
    prompts.write_text(json.dumps(messages) + "\n")
    follow = run_json("generate", run_dir, "--input", prompts, "--max-new-tokens", NEW, "--base")["results"][0]["output"]
    assert out.stdout == f"{first}\n{follow}\n{first}\n"
    fresh = run_json("generate", run_dir, "--prompt", second, "--max-new-tokens", NEW, "--base")["output"]
    assert follow != fresh  # the second answer saw the first turn
    assert run("chat", run_dir, "--max-new-tokens", NEW, "--base", input=f"{PROMPT}\n").stdout == f"{first}\n"  # EOF
    system = [{"role": "system", "content": "Answer in ISO 8601."}, {"role": "user", "content": PROMPT}]
    prompts.write_text(json.dumps(system) + "\n")
    opened = run_json("generate", run_dir, "--input", prompts, "--max-new-tokens", NEW, "--base")["results"][0]["output"]
    out = run("chat", run_dir, "--max-new-tokens", NEW, "--base", "--system", system[0]["content"], input=f"{PROMPT}\n")
    assert out.stdout == f"{opened}\n" and opened != first


def test_adapter_choice_and_bad_targets(tiny_llama, tiny_model_dir, tmp_path):
    """A folder with two adapters (PEFT's layout): --adapter picks one (the default without it); an
    unknown or path-like name, a missing folder, --base on a model folder: exit 2, one line."""
    from peftctl import LoraConfig, PeftModel

    model = PeftModel(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "two")
    assert (tmp_path / "two" / "other" / "adapter_config.json").is_file()
    answers = {name: run_json("generate", tmp_path / "two", "--prompt", PROMPT, "--max-new-tokens", NEW,
                              *(["--adapter", name] if name else []))
               for name in (None, "default", "other")}
    assert answers[None]["output"] == answers["default"]["output"]
    assert answers["other"]["adapter"] == str(tmp_path / "two" / "other")
    assert answers["other"]["output"] != answers["default"]["output"]
    sampled = [run_json("generate", tmp_path / "two", "--prompt", PROMPT, "--max-new-tokens", NEW,
                        "--temperature", "2", "--seed", seed)["output"] for seed in ("3", "3", "4")]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed gives the same sample again; another, another

    for args, message in [
        ([tmp_path / "two", "--adapter", "nope"], "no adapter named 'nope' here (adapters: default, other)"),
        ([tmp_path / "two", "--adapter", "../two"], "--adapter: adapter name '../two' is not a plain name"),
        ([tmp_path / "missing"], "missing: no such folder"),
        ([tiny_model_dir, "--base"], "--base applies to a run or adapter folder"),
        ([tmp_path / "two", "--top-p", "0.9"], "--top-p applies to sampling"),
        ([tmp_path / "two", "--temperature", "-1"], "--temperature must be a number >= 0"),
    ]:
        r = run("generate", *args, "--prompt", PROMPT, code=2)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run("chat", tmp_path / "missing", code=2, input="hi\n")
    assert "no such folder" in r.stderr


def test_predictions_file_matches_exact_match(make_recipe, tmp_path):
    """eval --predictions: one line per answered example, in data order, each marked as exact match
    marks it (so the file's count is exact_match's); refused when the file exists, unless --overwrite."""
    from test_eval import AFTER_EOS, ANSWER, build_scripted_model

    model = build_scripted_model(tmp_path / "scripted", ANSWER, AFTER_EOS)  # answers "fox jump" to anything
    references = ["fox jump", "fox", " fox  jump ", "Fox jump"]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": ref}]}) + "\n"
                            for i, ref in enumerate(references)))
    recipe = make_recipe(model={"name_or_path": str(model)}, data={"train": str(data), "eval": str(data)})
    out = tmp_path / "predictions.jsonl"
    res = run_json("eval", recipe, "--base", "--predictions", out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert res["predictions"] == str(out)
    assert [r["reference"] for r in rows] == references
    assert [r["prediction"] for r in rows] == [ANSWER] * 4
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert sum(r["correct"] for r in rows) == res["exact_match"] * res["exact_match_n"] == 2
    assert [r["source"] for r in rows] == [f"{data} row {i}" for i in range(1, 5)]
    assert rows[1]["input"] == "<|im_start|>user\nQuestion 1?<|im_end|>\n<|im_start|>assistant\n"
    assert "probability" not in rows[0]  # not a classification

    before = out.read_text()
    r = run("eval", recipe, "--base", "--predictions", out, code=2)
    assert f"--predictions {out} exists" in r.stderr and out.read_text() == before
    run("eval", recipe, "--base", "--predictions", out, "--overwrite")
    r = run("eval", recipe, "--base", "--predictions", tmp_path, code=2)
    assert "is a folder" in r.stderr


def test_classification_predictions_carry_the_labels_probability(make_recipe, tmp_path):
    """format: classification: each prediction row carries the probability the model gives its
    predicted label (the label's tokens and the EOS that ends it), which a plain forward pass on
    prompt + label + EOS gives too."""
    from test_eval import AFTER_EOS, ANSWER, build_scripted_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_scripted_model(tmp_path / "scripted", ANSWER, AFTER_EOS)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # a less certain model (the same greedy answer): each token's probability ~10%
        model.lm_head.weight.mul_(0.2)
    model.save_pretrained(folder)
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"Item {i}", "label": label}) + "\n"
                            for i, label in enumerate(["fox jump", "dog"])))
    recipe = make_recipe(model={"name_or_path": str(folder)},
                         data={"train": str(data), "eval": str(data), "format": "classification"})
    out = tmp_path / "predictions.jsonl"
    res = run_json("eval", recipe, "--base", "--predictions", out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False] and res["exact_match"] == 0.5

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for i, row in enumerate(rows):
        assert row["prediction"] == ANSWER
        prompt = tok(f"Item {i}\n")["input_ids"]
        answer = [*tok(ANSWER, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0].double()
        logp = sum(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[t].item() for k, t in enumerate(answer))
        # float32 logits from the cached decode vs one full forward differ by a few ulps (~1e-6
        # relative); over three tokens the probability agrees to well within 1e-4 relative.
        assert row["probability"] == pytest.approx(math.exp(logp), rel=1e-4)
        assert 0 < row["probability"] < 0.5  # an uncertain model: every factor counts


@pytest.mark.parametrize("fmt,row", [
    ("completion", {"prompt": "Convert May 3, 1999 to ISO: ", "completion": "1999-05-03"}),
    ("alpaca", {"instruction": "Convert May 3, 1999", "input": "", "output": "1999-05-03"}),
    ("classification", {"text": "Convert May 3, 1999", "label": "date"}),
])
def test_plain_format_prompts_are_evals_prompts(make_recipe, tiny_model_dir, tmp_path, fmt, row):
    """A run trained on a plain-text format: generate renders a string prompt as that format rendered
    its prompts, token for token the prompt `peftctl eval` generates from (`data --json`'s prompt_ids)."""
    from transformers import AutoTokenizer

    from peftctl.generate import Generator

    data = tmp_path / f"{fmt}.jsonl"
    data.write_text(json.dumps(row) + "\n")
    recipe = make_recipe(data={"train": str(data), "eval": str(data), "format": fmt, "max_length": 512})
    [example] = run_json("data", recipe, "--split", "eval")["examples"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gen = Generator(None, tok, "cpu", source="", adapter=None, data_format=fmt)
    prompt = row[{"completion": "prompt", "alpaca": "instruction", "classification": "text"}[fmt]]
    assert gen.prompt_ids(prompt) == example["prompt_ids"]
    raw = Generator(None, tok, "cpu", source="", adapter=None, data_format=fmt, raw=True)  # --raw: as it is
    assert raw.prompt_ids(prompt) == tok(prompt)["input_ids"]
    assert (raw.prompt_ids(prompt) == example["prompt_ids"]) == (fmt == "completion")  # a completion prompt is as is
