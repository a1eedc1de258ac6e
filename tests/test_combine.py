"""add_weighted_adapter gives PEFT's results for the same adapters, weights and seed, for every
combination type; `cat` is exactly the weighted sum of the deltas."""

from __future__ import annotations

import pytest
import torch

import peftctl

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


def test_bad_combinations_are_refused(two_adapters, tiny_llama):
    model = load_both(peftctl, tiny_llama, two_adapters)
    with pytest.raises(ValueError, match="needs a density"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="average")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model.add_weighted_adapter(["a", "c"], [1, 1], "m", combination_type="cat")
    assert set(model.peft_config) == {"a", "b"}
