"""add_weighted_adapter gives PEFT's results for the same adapters, weights and seed, for every
combination type; `cat` is exactly the weighted sum of the deltas."""

from __future__ import annotations

import re

import pytest
import torch

import peftctl
from peftctl.adapters import merge_utils as mu

peft = pytest.importorskip("peft", reason="peft is the reference for the combinations")

TYPES = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
         "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_model_dir):
    """Two saved adapters of equal rank on the tiny Llama (one on an embedding too)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "v_proj", "embed_tokens"], ["q_proj", "down_proj", "embed_tokens"]]
    for i, (name, t) in enumerate(zip(("a", "b"), targets, strict=True)):
        torch.manual_seed(10 + i)
        pm = peftctl.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    peftctl.LoraConfig(r=4, lora_alpha=6 + 4 * i, target_modules=t,
                                                       init_lora_weights=False))
        pm.save_pretrained(folder / name)
    return folder


def load_both(lib, tiny_llama, folder):
    model = lib.PeftModel.from_pretrained(tiny_llama(), folder / "a", adapter_name="a")
    model.load_adapter(folder / "b", adapter_name="b")
    return model


@pytest.mark.parametrize("combination_type", TYPES)
def test_same_result_as_peft(combination_type, two_adapters, tiny_llama):
    kwargs = {"density": 0.5} if combination_type not in ("linear", "cat", "svd") else {}
    if combination_type.endswith("svd"):
        kwargs["svd_rank"] = 3
    results = []
    ids = torch.randint(0, 300, (2, 10))
    for lib in (peftctl, peft):
        model = load_both(lib, tiny_llama, two_adapters)
        torch.manual_seed(0)  # DARE draws its random masks: the same seed gives the same masks
        model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs)
        model.set_adapter("mix")
        with torch.no_grad():
            results.append(model(input_ids=ids).logits)
        assert model.peft_config["mix"].r == {"cat": 8}.get(combination_type, 3 if "svd" in combination_type else 4)
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_cat_is_the_exact_weighted_sum(two_adapters, tiny_llama):
    model = load_both(peftctl, tiny_llama, two_adapters)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        expected = 0.7 * layer.delta_weight("a") - 0.4 * layer.delta_weight("b")
        assert torch.allclose(layer.delta_weight("mix"), expected, atol=1e-6)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)


def test_a_tied_position_elects_the_positive_sign_as_peft_does():
    """TIES keeps the entries whose sign agrees with their position's elected sign; where the votes
    cancel exactly (total 0, or as many + as -), + is elected, as in PEFT."""
    from peft.utils.merge_utils import calculate_majority_sign_mask

    t = torch.tensor([[1.0, -2.0, 0.5, -1.0], [-1.0, 2.0, -0.25, -3.0]])  # columns 0 and 1 cancel
    for method in ("total", "frequency"):  # column 2: + by total, a tie by frequency; column 3: -
        assert mu.majority_sign_mask(t, method).tolist() == [[True, False, True, True], [False, True, False, True]]
        assert torch.equal(mu.majority_sign_mask(t, method), calculate_majority_sign_mask(t, method))


def test_bad_combinations_are_refused(two_adapters, tiny_llama):
    model = load_both(peftctl, tiny_llama, two_adapters)
    with pytest.raises(ValueError, match="needs a density"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="average")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model.add_weighted_adapter(["a", "c"], [1, 1], "m", combination_type="cat")
    assert set(model.peft_config) == {"a", "b"}


# Ranks differ by layer: r=4, v_proj 1 (k=1 under r=4 came out 4x too large), layer 1's q_proj 2
# (other k crashed with a size mismatch).
PATTERN = {"v_proj": 1, "layers.1.self_attn.q_proj": 2}
LAYER_RANKS = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 2,
               "model.layers.0.self_attn.v_proj": 1, "model.layers.1.self_attn.v_proj": 1}


def patterned(tiny_llama, lora_bias=False):
    model = None
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(20 + i)
        cfg = peftctl.LoraConfig(r=4, lora_alpha=6 + 4 * i, target_modules=["q_proj", "v_proj"], rank_pattern=PATTERN,
                                 init_lora_weights=False, lora_bias=lora_bias)
        if model is None:
            model = peftctl.get_peft_model(tiny_llama(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    if lora_bias:
        with torch.no_grad():  # B's biases start at zero: make them count
            for n, p in model.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_()
    return model.eval()


def peft_reference(tiny_llama, ours, paths, k, combination_type, kwargs):
    """PEFT's combination of the same adapters restricted to layers of one rank k, where PEFT is right."""
    theirs = None
    for name in ("a", "b"):
        src = ours.peft_config[name]
        cfg = peft.LoraConfig(r=k, lora_alpha=src.lora_alpha, target_modules=paths)
        if theirs is None:
            theirs = peft.get_peft_model(tiny_llama(), cfg, adapter_name=name)
        else:
            theirs.add_adapter(name, cfg)
        with torch.no_grad():
            for path in paths:
                mine = ours.base_model.model.get_submodule(path)
                other = theirs.base_model.model.get_submodule(path)
                other.lora_A[name].weight.copy_(mine.lora_A[name].weight)
                other.lora_B[name].weight.copy_(mine.lora_B[name].weight)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs)
    return theirs


@pytest.mark.parametrize("combination_type", TYPES)
def test_each_layer_keeps_its_rank(combination_type, tiny_llama, tmp_path):
    kwargs = {"density": 0.5} if combination_type not in ("linear", "cat", "svd") else {}
    ours = patterned(tiny_llama)
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs)
    scale = {"cat": 2}.get(combination_type, 1)
    for path, k in LAYER_RANKS.items():
        layer = ours.base_model.model.get_submodule(path)
        assert layer.r["mix"] == k * scale and layer.scaling["mix"] == 1.0, path
    cfg = ours.peft_config["mix"]
    assert cfg.r == 4 * scale and cfg.rank_pattern == cfg.alpha_pattern == {
        re.escape(p): k * scale for p, k in LAYER_RANKS.items() if k != 4}
    with torch.no_grad():
        if combination_type == "cat":  # exact: the weighted sum of the deltas
            for path in LAYER_RANKS:
                layer = ours.base_model.model.get_submodule(path)
                expected = 0.7 * layer.delta_weight("a") - 0.4 * layer.delta_weight("b")
                assert torch.allclose(layer.delta_weight("mix"), expected, atol=1e-6), path
        elif not combination_type.startswith("dare"):  # DARE's random masks follow the layer order
            for k in sorted(set(LAYER_RANKS.values())):
                paths = [p for p, r in LAYER_RANKS.items() if r == k]
                theirs = peft_reference(tiny_llama, ours, paths, k, combination_type, kwargs)
                for path in paths:
                    expected = theirs.base_model.model.get_submodule(path).get_delta_weight("mix")
                    got = ours.base_model.model.get_submodule(path).delta_weight("mix")
                    assert torch.allclose(got, expected, atol=1e-5), (path, (got - expected).abs().max())
    # The recorded rank_pattern rebuilds the same adapter, here and in PEFT.
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    ours.set_adapter("mix")
    ids = torch.randint(0, 300, (2, 10))
    for lib in (peftctl, peft):
        loaded = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix", adapter_name="mix")
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5), lib.__name__


@pytest.mark.parametrize("combination_type", TYPES)
def test_lora_bias_is_combined(combination_type, tiny_llama):
    """B's biases combine like the deltas: one adapter at weight 1 is itself; cat and svd (of enough
    rank) give each layer's weighted sum of the adapters' outputs, bias included."""
    kwargs = {"density": 0.5} if combination_type not in ("linear", "cat", "svd") else {}
    if combination_type.endswith("svd"):
        kwargs["svd_rank"] = 8  # the rank of the sum: the truncation is exact
    ours = patterned(tiny_llama, lora_bias=True)
    ours.add_weighted_adapter(["a"], [1.0], "same", combination_type=combination_type, **kwargs)
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs)
    assert ours.peft_config["mix"].lora_bias and ours.peft_config["same"].lora_bias
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        ours.set_adapter("a")
        expected = ours(input_ids=ids).logits
        ours.set_adapter("same")
        assert torch.allclose(ours(input_ids=ids).logits, expected, atol=1e-5)  # was 0.77 off
        x = torch.randn(3, 64)
        for path in LAYER_RANKS:
            layer = ours.base_model.model.get_submodule(path)
            vectors = [layer.lora_B[n].bias * layer.scaling[n] for n in ("a", "b")]
            weights = torch.tensor([0.7, -0.4])
            if combination_type in ("linear", "cat", "svd", "ties_svd", "magnitude_prune_svd", "ties", "magnitude_prune"):
                kind = {"cat": "linear", "svd": "linear"}.get(combination_type, combination_type.removesuffix("_svd"))
                expected_bias = {"linear": mu.task_arithmetic(vectors, weights),
                                 "ties": mu.ties(vectors, weights, 0.5),
                                 "magnitude_prune": mu.magnitude_prune(vectors, weights, 0.5)}[kind]
                assert torch.allclose(layer.lora_B["mix"].bias, expected_bias, atol=1e-6), path
            if combination_type in ("cat", "svd"):
                outputs = {}
                for n in ("a", "b", "mix"):
                    layer.set_adapter(n, trainable=False)
                    outputs[n] = layer(x) - layer.base_layer(x)
                assert torch.allclose(outputs["mix"], 0.7 * outputs["a"] - 0.4 * outputs["b"], atol=1e-5), path
