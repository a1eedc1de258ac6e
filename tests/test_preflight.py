"""What `train` refuses before its first step, `train --dry-run` refuses with the same message and
exit code, and `validate` too where it can know without loading the model; `train` writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
from clirun import run
from tiny import build_tiny_llama

# A special token added to the tokenizer (id 300) and written by the chat template, on a model
# whose embedding matrix has 300 rows (ids 0 to 299).
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n<|tool|>{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<|tool|>{% endif %}"
)
TOKEN_MESSAGE = ("token '<|tool|>' (id 300) has no row in the model's embedding matrix (300 rows: ids 0 to 299); "
                 "give the model rows for the tokenizer's tokens")


@pytest.fixture(scope="module")
def outgrown_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("outgrown"), vocab_size=300)
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 300
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def weightless_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model's folder without its weights (config, tokenizer, template)."""
    folder = tmp_path_factory.mktemp("weightless")
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def pickle_model_dir(tmp_path_factory, weightless_dir):
    folder = tmp_path_factory.mktemp("pickle-only")
    shutil.copytree(weightless_dir, folder, dirs_exist_ok=True)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded: refused before")
    return folder


def _error(result) -> str:
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    return "\n".join(lines[start:])


def _cases(outgrown, pickle_only, weightless, tmp_path):
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo", "name": "bot"}]}) + "\n")
    # (name, recipe sections, validate's exit code (None: validate cannot know), message part)
    return [
        ("token beyond the embedding matrix", {"model": {"name_or_path": str(outgrown)}}, 2,
         f"model {outgrown}: the tokenizer: {TOKEN_MESSAGE}"),
        ("modules_to_save on a 4-bit layer",
         {"model": {"quantization": {"bits": 4}}, "adapter": {"modules_to_save": ["layers.0.self_attn.q_proj"]}},
         0, "adapter: modules_to_save names model.layers.0.self_attn.q_proj, which is a quantized layer "
            "(Linear4bit): its weights are stored as integer codes, so it cannot be trained in full; adapt it "
            "with LoRA instead (list it in target_modules)"),
        ("packing with an attention that cannot keep examples apart",
         {"model": {"attn_implementation": "flex_attention"}, "data": {"packing": True}}, 0,
         "data.packing: the attention implementation 'flex_attention' is not supported with packing"),
        ("pickle-only weights", {"model": {"name_or_path": str(pickle_only)}}, 2,
         f"model {pickle_only}: only pickle weights (pytorch_model.bin)"),
        ("no weights", {"model": {"name_or_path": str(weightless)}}, 2,
         f"model {weightless}: no weights (model.safetensors or model-*-of-*.safetensors)"),
        # validate parses every row as training does (issue 15), so it refuses the row too
        ("a message key the template ignores", {"data": {"train": str(named), "eval": None}}, 2,
         f"{named} row 1: messages[1].name: the chat template ignores this key"),
    ]


def test_train_and_dry_run_refuse_alike_and_train_writes_nothing(make_recipe, tmp_path, outgrown_model_dir,
                                                                  pickle_model_dir, weightless_dir):
    for name, sections, validate_code, message in _cases(outgrown_model_dir, pickle_model_dir, weightless_dir,
                                                         tmp_path):
        recipe = make_recipe(out="run", **sections)
        dry = run("train", recipe, "--dry-run", code=2)
        real = run("train", recipe, code=2)
        assert _error(dry) == _error(real), name
        assert message in _error(real), (name, _error(real))
        assert "Traceback" not in real.stderr and not (tmp_path / "run").exists(), name
        if validate_code is not None:
            checked = run("validate", recipe, code=validate_code)
            if validate_code == 2:
                assert message in checked.stderr, (name, checked.stderr)
        if message.startswith("adapter: "):  # inspect builds the same meta-device model
            assert _error(run("inspect", recipe, code=2)) == _error(real), name


def test_eval_refuses_a_tokenizer_that_outgrew_the_model(make_recipe, outgrown_model_dir):
    recipe = make_recipe(model={"name_or_path": str(outgrown_model_dir)})
    out = run("eval", recipe, "--base", code=2)
    assert f"model {outgrown_model_dir}: the tokenizer: {TOKEN_MESSAGE}" in out.stderr


def test_gguf_export_refuses_it_with_the_same_check(outgrown_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    from peftctl import gguf_writer
    from peftctl.errors import InputError

    tok = AutoTokenizer.from_pretrained(outgrown_model_dir)
    tj = json.loads(tok.backend_tokenizer.to_str())
    with pytest.raises(InputError, match=r"GGUF export: token '<\|tool\|>' \(id 300\) has no row"):
        gguf_writer._vocabulary(tj, AutoConfig.from_pretrained(outgrown_model_dir).vocab_size)

