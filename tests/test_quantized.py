"""Quantized bases (bitsandbytes 4-bit and 8-bit, on CPU): LoRA and DoRA numerics against the
dequantized formula, interop with PEFT both ways, k-bit training, evaluation that changes nothing,
and end to end: a QLoRA run, its merge into the full-precision base (and re-quantized), its GGUF and
merged exports, and the memory estimate.

bitsandbytes has two CPU paths for a 4-bit layer. The plain one (any CPU) dequantizes the weight and
multiplies in the layer's compute dtype. On a CPU with AVX512-BF16 it repacks the weight at the
first eval-mode forward and computes in bfloat16 from then on, with no backward (peftctl.bnb says
more). peftctl keeps its layers on the plain path, so the tests that touch 4-bit layers run on both
(`cpu_path`): on a CPU without AVX512-BF16 the second is skipped (bitsandbytes has no such kernel
there), so CI on either kind of CPU checks what it can, and this kind checks both."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run, run_json

from peftctl import LoraConfig, PeftModel, get_peft_model, models
from peftctl.adapters.lora.quantized import dequantize
from peftctl.recipe import ModelSection, QuantizationSection

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=["plain", "avx512_bf16"])
def cpu_path(request, monkeypatch):
    """The CPU path bitsandbytes' 4-bit layers built during the test would take if left alone:
    "plain" as on a CPU without AVX512-BF16 (bitsandbytes' own CPU check made to say no), or
    "avx512_bf16" on a CPU that has it (bitsandbytes would repack and compute in bfloat16)."""
    import bitsandbytes as bnb

    if request.param == "plain":
        # Linear4bit reads this check once, when it is built: layers built in the test never repack.
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    elif not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no bfloat16 CPU path to check here")
    return request.param


def quantized(folder, bits: int, dtype: str = "float32"):
    # Pinned to the CPU: these tests compare with CPU references (on a GPU machine the product would
    # otherwise place a quantized base on the GPU).
    return models.load_model(ModelSection(name_or_path=str(folder), dtype=dtype,
                                          quantization=QuantizationSection(bits=bits)), device_map={"": "cpu"})


def loaded_by_transformers(folder, bits: int):
    """The model quantized as a user's own code loads it, without peftctl: left alone, bitsandbytes
    would repack its 4-bit layers at their first eval-mode forward on an AVX512-BF16 CPU."""
    from transformers import AutoModelForCausalLM

    config = models.quantization_config(QuantizationSection(bits=bits), torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config,
                                                device_map={"": "cpu"})


def _quantized_layers(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


# The plain path computes x @ W.T in float32 from the dequantized W, as the references here do, but
# not necessarily summing in the same order: the results agree to float32 rounding of sums of at most
# 128 products of magnitude below 1, about 128 * 2**-24 < 1e-5. The same arithmetic run again in one
# process gives the same bits; 1e-6 leaves room for the order of threaded reductions.
ATOL = 1e-5
AGAIN = 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora_over_quantized_layers_follow_the_formula(tiny_model_dir, bits, dora, cpu_path):
    model = get_peft_model(loaded_by_transformers(tiny_model_dir, bits),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                      use_dora=dora))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantizedLinear"
    assert type(layer.base_layer).__name__ == {4: "Linear4bit", 8: "Linear8bitLt"}[bits]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = dequantize(layer.base_layer)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    model.eval()  # where bitsandbytes would repack
    with torch.no_grad():
        base = layer.base_layer(x)
        if bits == 4:  # the 4-bit layer multiplies by the dequantized weight in float32, on every CPU
            torch.testing.assert_close(base, x @ w.T, rtol=0, atol=ATOL)
        # (8 bits in eval mode is LLM.int8's inference: the activations are rounded to int8 too.)
        factor = layer.lora_magnitude_vector["default"] / (w + s * b @ a).norm(dim=1) if dora else 1.0
        expected = factor * (base + s * (x @ a.T) @ b.T)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=ATOL)  # a second call, after the first
    assert torch.equal(dequantize(layer.base_layer), w)  # running and reading it changed nothing
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
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_adapters_move_both_ways_with_peft(tiny_model_dir, tmp_path, bits, cpu_path):
    peft = pytest.importorskip("peft", reason="peft is the reference for interop")
    # PEFT's bases are loaded by peftctl's loader, which keeps them on the plain path: PEFT over a
    # base bitsandbytes repacked would compute in bfloat16 (about 4e-3 off per layer), no reference to
    # 1e-5. peftctl's own base is loaded as a user's code would (it must keep it plain by itself).
    torch.manual_seed(0)
    ref = peft.get_peft_model(quantized(tiny_model_dir, bits), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True))
    ref.save_pretrained(tmp_path / "from_peft")
    ours = PeftModel.from_pretrained(loaded_by_transformers(tiny_model_dir, bits), tmp_path / "from_peft")
    ours.save_pretrained(tmp_path / "from_peftctl")
    back = peft.PeftModel.from_pretrained(quantized(tiny_model_dir, bits), tmp_path / "from_peftctl")
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids).logits
        with ours.disable_adapter():
            assert (ours.eval()(input_ids=ids).logits - expected).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("bits", [4, 8])
def test_evaluating_a_quantized_model_changes_nothing(tiny_model_dir, bits, cpu_path):
    """Eval-mode forwards, with and without the adapter, and reading the weights leave the model as
    it was: training-mode logits and gradients, the base's outputs, the dequantized weights and
    DoRA's weight norms are the same before and after."""
    from peftctl.adapters.lora.quantized import QuantizedLinear

    # DoRA on q_proj and v_proj; k_proj, o_proj and the MLP stay bitsandbytes layers that the
    # adapters' gradients flow back through.
    model = get_peft_model(loaded_by_transformers(tiny_model_dir, bits), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True))
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))

    def state():
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=ids).logits
        return {
            "logits": out.logits.detach(), "base": base,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
            "weights": {n: dequantize(m) for n, m in _quantized_layers(model).items()},
            "norms": {n: m.dora_norm("default") for n, m in model.named_modules() if isinstance(m, QuantizedLinear)},
        }

    before = state()
    assert len(before["weights"]) == 14 and len(before["norms"]) == 4
    assert all(g.abs().sum() > 0 for n, g in before["grads"].items() if "layers.0" in n)
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        with model.disable_adapter():
            model(input_ids=ids)
    for m in _quantized_layers(model).values():
        dequantize(m)
    after = state()
    for key in ("logits", "base"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=AGAIN)
    for key in ("grads", "weights", "norms"):
        assert after[key].keys() == before[key].keys()
        for name in before[key]:
            torch.testing.assert_close(after[key][name], before[key][name], rtol=0, atol=AGAIN, msg=f"{key} {name}")
    if bits == 4:  # eval mode computes as training mode does (no dropout here); 8 bits: see above
        torch.testing.assert_close(evaluated, before["logits"], rtol=0, atol=ATOL)


def test_a_4bit_model_bitsandbytes_repacked_is_refused_by_name(tiny_model_dir, cpu_path):
    """A model the user's code ran in eval mode before adapting it: on the AVX512-BF16 path its 4-bit
    weights are repacked (block scales in bfloat16, no backward), so adapting or reading one is refused,
    naming the layer and what to do, and the layer is left as it was; on the plain path it adapts."""
    from peftctl.bnb import keep_plain_layout

    model = loaded_by_transformers(tiny_model_dir, 4)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        out = layer(x)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    if cpu_path == "avx512_bf16":
        with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: bitsandbytes has repacked "
                                             r".*Load the model again and adapt it before running it"):
            get_peft_model(model, config)
        with pytest.raises(ValueError, match="bitsandbytes has repacked this 4-bit weight"):
            dequantize(layer)
        with torch.no_grad():
            assert torch.equal(layer(x), out)  # the refusals changed nothing
        model = loaded_by_transformers(tiny_model_dir, 4)  # the remedy the message gives
        keep_plain_layout(model)
        with torch.no_grad():
            model(input_ids=ids)
    adapted = get_peft_model(model, config)
    adapted.train()
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    xg = x.clone().requires_grad_()
    w = dequantize(layer.base_layer)
    layer.base_layer(xg).sum().backward()  # the 4-bit base layer passes the input's gradient back
    torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x), rtol=0, atol=ATOL)


def test_cpu_switch_is_used_where_checked_and_the_public_fallback_computes_the_same(tiny_model_dir, cpu_path):
    """bitsandbytes' undocumented CPU switch (`support_avx512bf16_for_cpu`) is set only on the versions
    peftctl checked it with, this one among them; on another, each 4-bit layer computes through the
    public fallback (`peftctl.bnb.plain_forward`): the same outputs and input gradients as the
    switched-off layer, in eval mode without gradients (where bitsandbytes repacks on an AVX512-BF16
    CPU) and in training, and no weight is ever repacked."""
    import bitsandbytes as bnb

    from peftctl import bnb as fence

    # The gate (this test runs both ways whatever the installed version is).
    assert fence.switch_checked("0.50.2") and not fence.switch_checked("0.49.2") and not fence.switch_checked("0.51.0")
    models_ = {}
    for checked in (True, False):
        model = loaded_by_transformers(tiny_model_dir, 4)
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                fence._keep_layer_plain(m, checked)
        models_[checked] = {n: m for n, m in _quantized_layers(model).items()}
    assert all("forward" in vars(m) for m in models_[False].values())  # the fallback is what runs
    assert not any("forward" in vars(m) for m in models_[True].values())
    for name, switched in models_[True].items():
        fallback = models_[False][name]
        x = torch.randn(3, 5, switched.in_features, generator=torch.Generator().manual_seed(0))
        for mode in ("eval", "train"):
            outs, grads = [], []
            for layer in (switched, fallback):
                layer.train(mode == "train")
                xi = x.clone().requires_grad_(mode == "train")
                with torch.set_grad_enabled(mode == "train"):
                    out = layer(xi)
                if mode == "train":
                    out.sum().backward()
                    grads.append(xi.grad)
                outs.append(out)
            torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=ATOL, msg=f"{name} {mode}")
            if grads:
                torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=ATOL, msg=f"{name} gradient")
        for layer in (switched, fallback):
            assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name


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
    from peftctl.loss import loss_sum

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


def test_a_qlora_run_trains_the_same_with_and_without_evaluations(tmp_path, tiny_model_dir, chat_data, cpu_path):
    """`eval_every: 1` evaluates after every step; the training losses are those of a run without.
    (8-bit bases: test_evaluating_a_quantized_model_changes_nothing.)"""
    from tiny import recipe_text

    losses, evals = {}, {}
    for every in (None, 1):
        out = tmp_path / f"run-{every}"
        recipe = tmp_path / f"recipe-{every}.yaml"
        # DoRA on q_proj and v_proj reads the base weights; the other quantized layers pass gradients back.
        recipe.write_text(recipe_text(tiny_model_dir, str(chat_data[0]), str(chat_data[1]), str(out),
                                      model={"quantization": {"bits": 4}},
                                      adapter={"target_modules": ["q_proj", "v_proj"], "use_dora": True},
                                      train={"max_steps": 4, "log_every": 1, "lr": 2e-2,
                                             **({"eval_every": every} if every else {})}))
        run_json("train", recipe)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[every] = [r["loss"] for r in rows if "loss" in r]
        evals[every] = [r["step"] for r in rows if "eval_loss" in r]
    assert evals == {None: [4], 1: [1, 2, 3, 4]} and len(losses[None]) == 4
    assert losses[None][-1] < losses[None][0] - 0.05  # it trains
    # The same steps, the same arithmetic: equal up to the order of threaded reductions.
    assert losses[1] == pytest.approx(losses[None], rel=0, abs=1e-6)


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


def test_merge_of_a_qlora_adapter_is_made_in_full_precision(qlora_run, tmp_path, tiny_model_dir, cpu_path):
    peft = pytest.importorskip("peft", reason="peft is the reference for the merge")
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    # How far the model as trained (4-bit nf4 base with double quantization, float32 compute, plus the
    # adapter, in PEFT) is from it, as reported. The base computes on the plain path as in training
    # (peftctl's loader keeps it there; see `cpu_path`).
    trained = peft.PeftModel.from_pretrained(quantized(tiny_model_dir, 4), run_dir)
    trained_logits = _probe(trained, tok, PROBES)
    report = res["vs_quantized_training_model"]
    assert report["tokens"] == merged_logits.shape[0]
    assert report["max_abs_logit_diff"] == pytest.approx(float((trained_logits - merged_logits).abs().max()), abs=1e-5)
    assert 0 < report["max_abs_logit_diff"] and 0 <= report["kl_nats_per_token"] < 0.05
    assert report["top1_agreement"] == pytest.approx(
        float((trained_logits.argmax(-1) == merged_logits.argmax(-1)).float().mean()))


def test_merge_can_requantize_the_merged_model(qlora_run, tmp_path, cpu_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftctl.bnb import keep_plain_layout
    from peftctl.merge import PROBES

    run_dir, _ = qlora_run
    run_json("merge", run_dir, "-o", tmp_path / "full")
    res = run_json("merge", run_dir, "--quantize", "nf4", "-o", tmp_path / "q")
    assert res["quantized"]["type"] == "nf4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "q"]  # the staging folder is gone
    # the config says how to load it
    # dtype given: transformers 4.x loads a bitsandbytes model in float16 when none is (5.x: the config's)
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"}, dtype=torch.float32)
    assert isinstance(requantized.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    # The reported distance is the file's, on the plain path (the dequantized weights at the model's
    # dtype, the same on every CPU); bitsandbytes' bfloat16 path would give other numbers for it.
    keep_plain_layout(requantized)
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    moved = (_probe(requantized, tok, PROBES) - _probe(full, tok, PROBES)).abs().max()
    assert float(moved) == pytest.approx(res["quantized"]["vs_merged"]["max_abs_logit_diff"], abs=ATOL)
    r = run("merge", run_dir, "--quantize", "int4", "-o", tmp_path / "x", code=2)
    assert "--quantize must be one of nf4, fp4, int8" in r.stderr


def test_export_merged_and_gguf_give_the_merged_models_outputs(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftctl.models import gguf_tokenizer

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
    tok = gguf_tokenizer(tmp_path / "gguf" / "model.gguf")  # as peftctl reads it, also under transformers 4.x
    text = "<|im_start|>user\nConvert May 5, 1999 to ISO<|im_end|>\n"
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(run_dir)(text)["input_ids"]
    r = run("export", run_dir, "--format", "gguf", "--dtype", "int8", "-o", tmp_path / "bad", code=2)
    assert "--dtype must be float32, bfloat16 or float16" in r.stderr


def test_quantization_fields_are_checked(make_recipe):
    r = run("validate", make_recipe(model={"quantization": {"bits": 8, "quant_type": "fp4"}}), code=2)
    assert "model.quantization: quant_type applies to bits: 4, and this is bits: 8" in r.stderr
    r = run("validate", make_recipe(model={"quantization": {"bits": 3}}), code=2)
    assert "model.quantization.bits: must be one of 4 or 8 (got 3)" in r.stderr
