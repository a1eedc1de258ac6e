"""Any PyTorch module through the Python API (issue 13, item 8): `get_peft_model` on models that are not
transformers language models: a plain module (Linear, Conv2d, Embedding), a tiny diffusers UNet, and a tiny
BLIP captioning model. Each trains with the user's own loop, saves, loads on a fresh base, merges, and moves
both ways with PEFT (a test-only oracle) with the same outputs.

Tolerances (fp32): the adapter's output `W x + s B (A x)` and the merged `(W + s B A) x` add the same
products in another order, and PEFT's forward orders them as peftctl's unmerged one does, give or take
the scaling's place. Reassociating a dot product of length n moves it by at most about n * u * sum|w_i x_i|
(u = 2**-24 = 6e-8, the fp32 unit roundoff); with n <= 128 here that is below 1e-5 of the sums' magnitude
per layer, and the few layers in a row (each normalised: GroupNorm, LayerNorm) do not grow it much. So
outputs are compared at 1e-4 relative to their largest magnitude (a 10x margin over that bound), while the
adapter's own effect (checked too, so the comparisons can fail) is at least 100x larger.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftctl

peft = pytest.importorskip("peft", reason="peft is the interop reference; install the test extra")


class Plain(nn.Module):
    """A module with no transformers parts: token embedding -> Conv2d over the (tokens x features) grid -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8, 3)

    def forward(self, ids):
        grid = self.emb(ids).unsqueeze(1)  # (batch, 1, tokens, 8)
        return self.head(torch.relu(self.conv(grid)).mean(2).flatten(1))


def plain_case():
    torch.manual_seed(0)
    inputs = {"ids": torch.randint(0, 40, (6, 5))}
    target = torch.randint(0, 3, (6,))

    def loss(model, x):
        return nn.functional.cross_entropy(model(**x), target)

    return Plain, inputs, lambda m, x: m(**x), loss, {"target_modules": ["emb", "conv", "head"]}


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8).eval()


def unet_case():
    pytest.importorskip("diffusers", reason="diffusers builds the UNet; install the test extra")
    torch.manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([3, 500]),
              "encoder_hidden_states": torch.randn(2, 5, 16)}
    noise = torch.randn(2, 4, 8, 8)

    def loss(model, x):  # a denoising step's loss: the predicted noise against the true one
        return nn.functional.mse_loss(model(**x).sample, noise)

    return tiny_unet, inputs, lambda m, x: m(**x).sample, loss, {"target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}


def tiny_blip():
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "encoder_hidden_size": 32,
                     "bos_token_id": 1, "sep_token_id": 2, "pad_token_id": 0, "eos_token_id": 2},
        projection_dim=32)
    return BlipForConditionalGeneration(config).eval()


def blip_case():
    torch.manual_seed(0)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "input_ids": torch.randint(3, 64, (2, 7))}

    def loss(model, x):  # captioning: the caption's tokens as labels
        return model(**x, labels=x["input_ids"]).loss

    # LoRA on the vision encoder's fused qkv, the text decoder's attention (self and cross) and its
    # word embeddings.
    return tiny_blip, inputs, lambda m, x: m(**x).logits, loss, {
        "target_modules": ["qkv", "query", "value", "word_embeddings"]}


CASES = {"plain": plain_case, "unet": unet_case, "blip": blip_case}


def close(a, b, rel=1e-4):
    """a equals b up to `rel` of b's largest magnitude (see the module docstring)."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_user_loop_save_load_merge_and_peft_both_ways(case, tmp_path):
    build, inputs, forward, loss_fn, kw = CASES[case]()

    def base():
        torch.manual_seed(1)  # the same base weights every time
        return build()

    config = peftctl.LoraConfig(r=4, lora_alpha=8, **kw)
    model = peftctl.get_peft_model(base(), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        before = forward(model.eval(), inputs)
        assert torch.equal(before, forward(base(), inputs))  # LoRA starts as a no-op

    # The user's own loop.
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    losses = []
    for _ in range(8):
        loss = loss_fn(model, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        trained = forward(model, inputs)
    # The adapter changed the outputs by far more than the comparisons' tolerance.
    assert not close(trained, before, rel=1e-2)

    model.save_pretrained(tmp_path / "ours")
    loaded = peftctl.PeftModel.from_pretrained(base(), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(forward(loaded, inputs), trained)  # the same computation on the same tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            in_peft = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
        assert close(forward(in_peft, inputs), trained)
        merged = loaded.merge_and_unload()
        assert not any("lora" in n for n, _ in merged.named_modules())
        assert close(forward(merged, inputs), trained)

    # The reverse: an adapter PEFT made (random A and B: not a no-op) loads here with PEFT's outputs.
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)).eval()
        theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        expected = forward(theirs, inputs)
        assert not close(expected, before, rel=1e-2)
        in_ours = peftctl.PeftModel.from_pretrained(base(), tmp_path / "theirs")
        assert close(forward(in_ours, inputs), expected)


def test_generative_task_type_on_a_custom_module_warns(tmp_path):
    """CAUSAL_LM on a module without generation hooks: peftctl wraps it (the task type changes nothing
    here) but says that PEFT could not load the file; PEFT indeed refuses to wrap such a module."""
    config = {"target_modules": ["head"], "task_type": "CAUSAL_LM"}
    with pytest.warns(UserWarning, match="PEFT cannot load"):
        model = peftctl.get_peft_model(Plain(), peftctl.LoraConfig(**config))
    with pytest.warns(UserWarning, match="PEFT cannot load"):
        model.add_adapter("other", peftctl.LoraConfig(**{**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(AttributeError, match="prepare_inputs_for_generation"):
        peft.get_peft_model(Plain(), peft.LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no task type, or one PEFT can use with any module: no warning
        peftctl.get_peft_model(Plain(), peftctl.LoraConfig(target_modules=["head"]))
        peftctl.get_peft_model(tiny_blip(), peftctl.LoraConfig(target_modules=["query"], task_type="CAUSAL_LM"))


def test_readme_snippet_runs(tmp_path, monkeypatch):
    """README's "Any PyTorch module" example runs as written (its own assert checks the merge)."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Any PyTorch module", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Any PyTorch module)", "exec"), {"__name__": "readme"})
    assert (tmp_path / "net-adapter" / "adapter_model.safetensors").is_file()


# Other adapter kinds on the same modules: (case, PEFT config class, its options). Conv layers and
# embeddings under DoRA, a module trained in full, LyCORIS methods (common for diffusion models).
VARIANTS = {
    "plain-dora": ("plain", "LoraConfig", {"target_modules": ["emb", "conv", "head"], "use_dora": True}),
    "plain-modules_to_save": ("plain", "LoraConfig", {"target_modules": ["emb", "conv"], "modules_to_save": ["head"]}),
    "unet-loha": ("unet", "LoHaConfig", {"target_modules": ["to_k", "to_q", "to_v", "to_out.0", "conv1"]}),
    "blip-dora": ("blip", "LoraConfig", {"target_modules": ["qkv", "query", "word_embeddings"], "use_dora": True}),
}
_RANDOM_INIT = {"LoraConfig": {"init_lora_weights": False}, "LoHaConfig": {"init_weights": False}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_adapters_on_custom_modules_match_peft(variant, tmp_path):
    case, cls, kw = VARIANTS[variant]
    build, inputs, forward, _, _ = CASES[case]()

    def base():
        torch.manual_seed(1)
        return build()

    kw = {**kw, **_RANDOM_INIT[cls]}  # random adapter weights: not a no-op
    torch.manual_seed(5)
    ours = peftctl.get_peft_model(base(), getattr(peftctl, cls)(**kw)).eval()
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), getattr(peft, cls)(**kw)).eval()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        for p in ours.parameters():  # so that loading is what makes the two agree
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    in_ours = peftctl.PeftModel.from_pretrained(base(), tmp_path / "theirs")
    with torch.no_grad():
        plain, mine, their = forward(base(), inputs), forward(ours, inputs), forward(theirs, inputs)
        assert not close(mine, plain, rel=1e-2) and not close(their, plain, rel=1e-2)
        assert close(forward(in_peft, inputs), mine)
        assert close(forward(in_ours, inputs), their)
        assert close(forward(ours.merge_and_unload(), inputs), mine)


def test_save_embedding_layers_true_without_embedding_getters_warns(tmp_path):
    """A module without get_input_embeddings has no embedding matrix to add to the file: said, not
    silently skipped (PEFT warns too); the adapter's own tensors, the adapted embedding's included, are saved."""
    from safetensors import safe_open

    model = peftctl.get_peft_model(Plain(), peftctl.LoraConfig(target_modules=["emb", "head"]))
    with pytest.warns(UserWarning, match="no embedding layer found"):
        model.save_pretrained(tmp_path / "ours", save_embedding_layers=True)
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B",
                                    "base_model.model.head.lora_A.weight", "base_model.model.head.lora_B.weight"]
    theirs = peft.get_peft_model(Plain(), peft.LoraConfig(target_modules=["emb", "head"]))
    with pytest.warns(UserWarning, match="not a .* transformers model"):
        theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default ("auto") has nothing to say here
        model.save_pretrained(tmp_path / "auto")


def test_no_default_targets_for_a_custom_module():
    """PEFT's default targets are per transformers model type: a custom module must name its targets."""
    with pytest.raises(ValueError, match=r"no default for model type None \(Plain is not a transformers model\)"):
        peftctl.get_peft_model(Plain(), peftctl.LoraConfig(r=2))
