"""GGUF files written by peftctl.gguf_writer, read back by transformers' own GGUF loader, and GGUF
bases loaded through peftctl.models (a file, a folder holding one, and quantized)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from peftctl import gguf_writer, models
from peftctl.errors import InputError
from peftctl.recipe import ModelSection, QuantizationSection

TEXTS = ["Convert March 3, 2001 to ISO: 2001-03-03", "<|im_start|>user\nhi<|im_end|>\n",
         "  spaces  and\ttabs\n\nÜnïcode 😀 1234567"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_model_dir):
    """The tiny model (untied head) and a copy with tied embeddings, each written as float32 GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {}
    for tied in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if tied:  # the head shares the embedding matrix (SmolLM2, Llama 3.2 1B)
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        folder = tmp_path_factory.mktemp(f"gguf-tied-{tied}")
        info = gguf_writer.write(model, tok, folder / "tiny.gguf", dtype="float32", name="tiny")
        out[tied] = (model, folder, info)
    return tok, out


def _read_back(folder, name="tiny.gguf"):
    """The model as transformers reads the file, and the tokenizer as peftctl does (transformers'
    reader, with the file's special tokens and BOS setting, which transformers 4.x reads otherwise)."""
    from transformers import AutoModelForCausalLM

    from peftctl.models import gguf_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32),
                gguf_tokenizer(Path(folder) / name))


@pytest.mark.parametrize("tied", [False, True])
def test_float32_gguf_reads_back_with_the_same_logits_and_tokens(written, tied):
    tok, out = written
    model, folder, info = out[tied]
    assert info["pre_tokenizer"] == "gpt-2" and info["tensors"] == 2 * 9 + 2 + (0 if tied else 1)
    back, back_tok = _read_back(folder)
    assert back.config.tie_word_embeddings == tied and back.config.num_key_value_heads == 2
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    for text in TEXTS:  # the tokenizer travels in the file: same ids, same special tokens and template
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.eos_token, back_tok.bos_token) == (tok.eos_token, tok.bos_token)


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-3), ("bfloat16", 3e-2)])
def test_half_precision_gguf_is_the_model_rounded(written, tmp_path, dtype, atol):
    import gguf

    tok, out = written
    model = out[False][0]
    gguf_writer.write(model, tok, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay float32, as llama.cpp wants
    back, _ = _read_back(tmp_path, "m.gguf")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (back(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert 0 < diff < atol


def test_other_architectures_and_sentencepiece_tokenizers_are_refused():
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import GPT2Config, PreTrainedTokenizerFast

    with pytest.raises(InputError, match="llama-family.*'gpt2'.*--format merged"):
        gguf_writer.check_config(GPT2Config(), "my-gpt2")
    spm = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.BPE(vocab={"a": 0, "<0x00>": 1}, merges=[],
                                                                               byte_fallback=True)))
    with pytest.raises(InputError, match="byte-level BPE.*byte fallback"):
        gguf_writer.check_tokenizer(spm)


def test_models_load_a_gguf_file_and_a_folder_holding_one(written):
    model = written[1][False][0]
    folder = written[1][False][1]
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for where in (folder / "tiny.gguf", folder):
        assert models.resolve(str(where)) == models.ModelSource("gguf", str(folder), "tiny.gguf")
        loaded, tok = models.load(ModelSection(name_or_path=str(where), dtype="float32"))
        assert loaded.hf_quantizer is None and tok.pad_token is not None
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_a_gguf_base_to_quantize_is_converted_once_into_the_cache(written, tmp_path, capfd):
    import bitsandbytes as bnb

    folder = written[1][False][1]
    spec = ModelSection(name_or_path=str(folder / "tiny.gguf"), dtype="float32", cache_dir=str(tmp_path),
                        quantization=QuantizationSection(bits=4))
    capfd.readouterr()
    loaded = models.load_model(spec)
    # stderr is no terminal here: transformers' own GGUF bar stays out of it (issue 15)
    assert "Converting and de-quantizing" not in capfd.readouterr().err
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    (converted,) = (tmp_path / "models").iterdir()
    assert converted.name.startswith("gguf-tiny-") and (converted / "model.safetensors").exists()
    stamp = converted.stat().st_mtime_ns
    models.load_model(spec)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [converted.name]
    assert converted.stat().st_mtime_ns == stamp  # not converted again
