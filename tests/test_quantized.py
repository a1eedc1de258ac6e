"""Quantized bases (bitsandbytes 4-bit and 8-bit, on CPU): LoRA and DoRA numerics against the
dequantized formula, interop with PEFT both ways, k-bit training, and end to end: a QLoRA run, its
merge into the full-precision base (and re-quantized), its GGUF and merged exports, and the
memory estimate."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run, run_json

from peftctl import LoraConfig, PeftModel, get_peft_model, models
from peftctl.adapters.lora.quantized import dequantize
from peftctl.recipe import ModelSection, QuantizationSection

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def quantized(folder, bits: int, dtype: str = "float32"):
    # Pinned to the CPU: these tests compare with CPU references (on a GPU machine the product would
    # otherwise place a quantized base on the GPU).
    return models.load_model(ModelSection(name_or_path=str(folder), dtype=dtype,
                                          quantization=QuantizationSection(bits=bits)), device_map={"": "cpu"})


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora_over_quantized_layers_follow_the_formula(tiny_model_dir, bits, dora):
    model = get_peft_model(quantized(tiny_model_dir, bits),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                      use_dora=dora))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantizedLinear"
    assert type(layer.base_layer).__name__ == {4: "Linear4bit", 8: "Linear8bitLt"}[bits]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = dequantize(layer.base_layer)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        base = layer.base_layer(x)
        if bits == 4:  # bitsandbytes' 4-bit matmul is the dequantized weight's, exactly
            torch.testing.assert_close(base, x @ w.T, rtol=0, atol=1e-5)
        factor = layer.lora_magnitude_vector["default"] / (w + s * b @ a).norm(dim=1) if dora else 1.0
        expected = factor * (base + s * (x @ a.T) @ b.T)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"merging into a quantized Linear(4bit|8bitLt) weight is refused: .* rounded "
                                         r"back to (4|8) bits.*peftctl merge RUN_DIR"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="init_lora_weights='pissa' rewrites the base weight .* is a Linear"):
        get_peft_model(quantized(tiny_model_dir, bits), LoraConfig(r=2, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa"))


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_with_dropout_over_quantized_layers_runs_the_base_on_the_dropped_input(tiny_model_dir, bits):
    """In training with dropout, DoRA's base term is W·dropout(x) (PEFT's formula): the quantized
    layer runs again on the dropped-out input. The reference uses the same bitsandbytes layer for
    W·x, so only the order of float32 operations differs."""
    model = get_peft_model(quantized(tiny_model_dir, bits),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights=False,
                                      use_dora=True, lora_dropout=0.3))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    layer.train()
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(7)
        out = layer(x)
        torch.manual_seed(7)  # the layer draws nothing random before its dropout
        xd = torch.nn.functional.dropout(x, 0.3, training=True)
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        factor = layer.lora_magnitude_vector["default"] / (dequantize(layer.base_layer) + s * b @ a).norm(dim=1)
        expected = layer.base_layer(x) + (factor - 1) * layer.base_layer(xd) + factor * (s * (xd @ a.T) @ b.T)
    assert layer.base_layer.bias is None and (xd == 0).any()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_adapters_move_both_ways_with_peft(tiny_model_dir, tmp_path, bits):
    peft = pytest.importorskip("peft", reason="peft is the reference for interop")
    torch.manual_seed(0)
    ref = peft.get_peft_model(quantized(tiny_model_dir, bits), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True))
    ref.save_pretrained(tmp_path / "from_peft")
    ours = PeftModel.from_pretrained(quantized(tiny_model_dir, bits), tmp_path / "from_peft")
    ours.save_pretrained(tmp_path / "from_peftctl")
    back = peft.PeftModel.from_pretrained(quantized(tiny_model_dir, bits), tmp_path / "from_peftctl")
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids).logits
        with ours.disable_adapter():
            assert (ours.eval()(input_ids=ids).logits - expected).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_kbit_training_keeps_frozen_weights_as_loaded_and_checkpointing_gives_the_same_gradients(make_recipe):
    """The training model of a 4-bit recipe: nothing in float32 but the adapter, checkpointing on by
    default and recomputing each layer, gradients as without it."""
    from tiny import checkpointing_runs

    from peftctl import recipe as recipe_lib
    from peftctl.train import prepare_model, resolved

    r = resolved(recipe_lib.load(make_recipe(model={"dtype": "bfloat16", "quantization": {"bits": 4}},
                                             adapter={"target_modules": "all-linear"})))
    assert r.train.gradient_checkpointing is True and r.model.quantization.compute_dtype == "bfloat16"
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def make_model():
        model, _ = prepare_model(r, device_map={"": "cpu"})
        float32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
        assert float32 == {n for n, p in model.named_parameters() if p.requires_grad}  # the adapter only
        assert {p.dtype for n, p in model.named_parameters() if n not in float32} == {torch.bfloat16, torch.uint8}
        return model

    calls, grads = checkpointing_runs(make_model, batch)
    assert calls == [1, 2]
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0] if "lora_B" in n)
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=0.02, atol=1e-4) for n in grads[0])


def test_8bit_base_trains(tiny_model_dir):
    from peftctl.train.loss import loss_sum

    model = get_peft_model(quantized(tiny_model_dir, 8), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = []
    for _ in range(4):
        loss, n = loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss / n))
    assert losses[-1] < losses[0] - 0.05


def _storage_bytes(model) -> dict[str, int]:
    """What bitsandbytes actually stores for the quantized weights, by kind."""
    import bitsandbytes as bnb

    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            s = m.weight.quant_state
            parts = [m.weight.data, s.absmax, s.code] + ([s.state2.absmax, s.state2.code, s.offset] if s.nested else [])
            out["nf4+dq"] = out.get("nf4+dq", 0) + sum(t.nbytes for t in parts)
        elif isinstance(m, bnb.nn.Linear8bitLt):
            out["int8"] = out.get("int8", 0) + m.weight.data.nbytes + m.weight.SCB.nbytes
    return out


def test_memory_estimate_counts_quantized_weights_as_stored_and_checkpointing(make_recipe, tiny_model_dir):
    plain = run_json("inspect", make_recipe(adapter={"target_modules": "all-linear"}), "--memory")["memory"]
    activations = {}
    for bits in (4, 8):
        res = run_json("inspect", make_recipe(model={"quantization": {"bits": bits}},
                                              adapter={"target_modules": "all-linear"}), "--memory")
        mem = res["memory"]
        activations[bits] = mem["activations_without_checkpointing"]
        stored = _storage_bytes(quantized(tiny_model_dir, bits))
        kind = next(iter(stored))
        assert mem["weights"][kind] == stored[kind]
        # the head and the embeddings stay unquantized, in model.dtype
        assert mem["weights"]["float32"] == 4 * (2 * 320 * 64 + 5 * 64)
        assert mem["base_weights"] < plain["base_weights"]
        assert {r["type"] for r in res["modules"]} == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
        # r=4 on q, k, v, o, gate, up, down of 2 layers: r × (in + out) each
        assert res["trainable_params"] == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    # Every linear is adapted, so 8-bit layers keep no input the adapters do not keep already; a
    # quantized base adds one dequantized weight (the largest, 128 x 64, in float32) to the backward.
    assert activations[4] == activations[8] == plain["activations_without_checkpointing"] + 4 * 128 * 64
    assert mem["gradient_checkpointing"] and not plain["gradient_checkpointing"]  # on by default when quantized
    assert mem["activations"] == mem["activations_with_checkpointing"] < mem["activations_without_checkpointing"]
    parts = ("base_weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")
    assert mem["total"] == sum(mem[k] for k in parts)
    assert mem["adapter_weights"] == mem["gradients"] == 4 * res["trainable_params"]
    assert mem["optimizer_states"] == 2 * mem["adapter_weights"]  # AdamW: two float32 states
    text = run("inspect", make_recipe(model={"quantization": {"bits": 4}}), "--memory").stdout
    assert "nf4+dq" in text and "checkpointing on (this recipe)" in text and "4-bit nf4" in text


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir, chat_data):
    """A short QLoRA run (4-bit nf4 base, LoRA on every linear layer) shared by the tests below."""
    from tiny import recipe_text

    folder = tmp_path_factory.mktemp("qlora")
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), None, "run",
                                  model={"quantization": {"bits": 4}},
                                  adapter={"target_modules": "all-linear", "r": 8, "lora_alpha": 16},
                                  train={"max_steps": 6, "lr": 2e-2}))
    summary = run_json("train", recipe)
    return folder / "run", summary


def test_a_qlora_run_trains_and_records_how(qlora_run):
    run_dir, summary = qlora_run
    assert summary["status"] == "completed"
    saved = (run_dir / "recipe.yaml").read_text()
    assert "gradient_checkpointing: true" in saved and "compute_dtype: float32" in saved
    card_dir = run_dir.parent / "card"
    run_json("export", run_dir, "--format", "peft", "-o", card_dir)
    card = (card_dir / "README.md").read_text()
    assert "4-bit nf4 (double quantization)" in card and "quantization:" in card  # the recipe is in it


def _probe(model, tokenizer, texts) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([tokenizer(t)["input_ids"][:64]], device=model.device))
                          .logits[0].float().cpu() for t in texts])


def test_merge_of_a_qlora_adapter_is_made_in_full_precision(qlora_run, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is the reference for the merge")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from peftctl.merge import PROBES

    run_dir, _ = qlora_run
    res = run_json("merge", run_dir, "-o", tmp_path / "merged")
    assert res["max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    # PEFT's merge of the same adapter into the float32 base
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).merge_and_unload()
    merged_logits = _probe(merged, tok, PROBES)
    torch.testing.assert_close(merged_logits, _probe(ref, tok, PROBES), rtol=0, atol=1e-5)
    # how far the model as trained (4-bit base + adapter, in PEFT) is from it, as reported
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    trained = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, device_map={"": "cpu"}), run_dir)
    trained_logits = _probe(trained, tok, PROBES)
    report = res["vs_quantized_training_model"]
    assert report["tokens"] == merged_logits.shape[0]
    assert report["max_abs_logit_diff"] == pytest.approx(float((trained_logits - merged_logits).abs().max()), abs=1e-5)
    assert 0 < report["max_abs_logit_diff"] and 0 <= report["kl_nats_per_token"] < 0.05
    assert report["top1_agreement"] == pytest.approx(
        float((trained_logits.argmax(-1) == merged_logits.argmax(-1)).float().mean()))


def test_merge_can_requantize_the_merged_model(qlora_run, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftctl.merge import PROBES

    run_dir, _ = qlora_run
    run_json("merge", run_dir, "-o", tmp_path / "full")
    res = run_json("merge", run_dir, "--quantize", "nf4", "-o", tmp_path / "q")
    assert res["quantized"]["type"] == "nf4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "q"]  # the staging folder is gone
    # the config says how to load it
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    assert isinstance(requantized.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    moved = (_probe(requantized, tok, PROBES) - _probe(full, tok, PROBES)).abs().max()
    assert float(moved) == pytest.approx(res["quantized"]["vs_merged"]["max_abs_logit_diff"], abs=1e-5)
    r = run("merge", run_dir, "--quantize", "int4", "-o", tmp_path / "x", code=2)
    assert "--quantize must be one of nf4, fp4, int8" in r.stderr


def test_export_merged_and_gguf_give_the_merged_models_outputs(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = qlora_run
    run_json("merge", run_dir, "-o", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged(input_ids=ids).logits

    res = run_json("export", run_dir, "--format", "merged", "--dtype", "bfloat16", "--max-shard-size", "100KB",
                   "-o", tmp_path / "sharded")
    folder = tmp_path / "sharded"
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert (folder / "generation_config.json").exists() and (folder / "tokenizer.json").exists()
    assert res["dtype"] == "bfloat16" and "vs_quantized_training_model" in res
    with torch.no_grad():
        diff = (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits - expected)
    assert 0 < diff.abs().max() < 0.05  # bfloat16 rounding of the same weights

    res = run_json("export", run_dir, "--format", "gguf", "--dtype", "float32", "-o", tmp_path / "gguf")
    assert res["file"] == str(tmp_path / "gguf" / "model.gguf") and res["pre_tokenizer"] == "gpt-2"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    text = "<|im_start|>user\nConvert May 5, 1999 to ISO<|im_end|>\n"
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(run_dir)(text)["input_ids"]
    r = run("export", run_dir, "--format", "gguf", "--dtype", "int8", "-o", tmp_path / "bad", code=2)
    assert "--dtype must be float32, bfloat16 or float16" in r.stderr


def test_quantization_fields_are_checked(make_recipe):
    r = run("validate", make_recipe(model={"quantization": {"bits": 8, "quant_type": "fp4"}}), code=2)
    assert "model.quantization: quant_type applies to bits: 4, and this is bits: 8" in r.stderr
    r = run("validate", make_recipe(model={"quantization": {"bits": 3}}), code=2)
    assert "model.quantization.bits: must be one of 4 or 8 (got 3)" in r.stderr
