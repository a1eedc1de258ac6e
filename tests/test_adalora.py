"""AdaLoRA against Hugging Face PEFT (a test-only reference): a fixed training run whose masks and
weights are PEFT's, adapters moving both ways with the same outputs (full and pruned), merging,
several adapters, quantized bases, and the refusals where PEFT cannot do something either.

Tolerances. The fixed run: both sides run the same float32 operations in the same order on the
same CPU (the forward `(x @ (Q*Λ)ᵀ @ Pᵀ) * s / (ranknum + 1e-5)`, the same orthogonality sum, the
same element-wise averages and `kthvalue`), so weights and masks are compared exactly: any
difference is a different formula, and a single flipped triplet shows. Outputs of loaded adapters:
to float32 rounding of the base matmuls (sums of about 100 products of magnitude below 1, 2**-24
each): atol 1e-5. Merging adds P(QΛ)s/ranknum to weights of order 0.1-1 once: the merged forward
differs from the unmerged one by rounding of the reordered sum, well within 1e-5 on these sizes.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from tiny_modules import make, tiny_gpt2

import peftctl
from peftctl import AdaLoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft", reason="peft is the AdaLoRA reference; install the test extra")

ATOL = 1e-5


def theirs_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and custom models
        return peft.get_peft_model(base, peft.AdaLoraConfig(**kw))


def keys_and_shapes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


def tensors(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_params(model):
    """name -> tensor of the adapter's A, E, B (PEFT's and peftctl's names are the same)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(f".lora_{k}." in n for k in "AEB")}


def test_default_targets_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    from peftctl.adapters.adalora.config import DEFAULT_TARGETS

    assert DEFAULT_TARGETS == PEFT_TARGETS


# The fixed run: 4 adapted modules x init_r 4 = 16 triplets, pruned to target_r 2 x 4 = 8 by step 10
# (tinit 2, tfinal 3 of 13 steps), with gradient steps from AdamW.
RUN = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 13, "lora_alpha": 16,
       "beta1": 0.8, "beta2": 0.9, "orth_reg_weight": 0.3, "target_modules": ["q_proj", "v_proj"],
       "task_type": "CAUSAL_LM"}  # PEFT adds its orthogonality term only through a task type's model class


def _peft_run(base, batches):
    model = theirs_model(base, **RUN)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step, ids in enumerate(batches, start=1):
        model(input_ids=ids, labels=ids).loss.backward()  # PEFT adds the orthogonality term to .loss
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model


def _our_run(base, batches, stop_after=None, hooks_state=None, opt_state=None):
    model = get_peft_model(base, AdaLoraConfig(**RUN))
    hooks = model.base_model.training_hooks()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step, ids in enumerate(batches, start=1):
        loss = model(input_ids=ids, labels=ids).loss
        for term in hooks.loss_terms().values():
            loss = loss + term
        loss.backward()
        opt.step()
        hooks.after_optimizer_step(step)
        opt.zero_grad()
    return model, hooks


def test_a_fixed_run_prunes_to_peft_s_masks_and_weights(tiny_llama, tmp_path):
    """Same initial weights (same seed), same batches, same optimizer: after the schedule has pruned,
    the live weights, the masks and the saved adapter (cut to the surviving triplets) are PEFT's."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 300, (2, 10), generator=gen) for _ in range(RUN["total_step"])]
    torch.manual_seed(11)
    theirs = _peft_run(tiny_llama(), batches)
    torch.manual_seed(11)
    ours, hooks = _our_run(tiny_llama(), batches)

    mine, ref = adapter_params(ours), adapter_params(theirs)
    assert mine.keys() == ref.keys() and len(mine) == 12
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name  # same operations, same order: identical bits
    pattern = theirs.peft_config["default"].rank_pattern
    kept = {k.removesuffix(".default"): v for k, v in pattern.items()}
    assert sum(sum(v) for v in kept.values()) == 8 and any(sum(v) != 2 for v in kept.values())  # uneven ranks
    hooks.end()  # the run is over: cut the layers to the surviving triplets, record them
    assert ours.peft_config["default"].rank_pattern == kept
    assert ours.peft_config["default"].total_step == RUN["total_step"]

    ids = batches[0]
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    saved_ours, saved_theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert saved_ours.keys() == saved_theirs.keys()
    for k in saved_theirs:
        assert torch.equal(saved_ours[k], saved_theirs[k]), k
    cfgs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for field in ("peft_type", "rank_pattern", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                  "orth_reg_weight", "total_step", "lora_alpha", "inference_mode"):
        assert cfgs[0][field] == cfgs[1][field], field

    # Each library loads the other's pruned file (layers of the surviving ranks, ranknum init_r).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    in_ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    expected = logits(theirs, ids)
    torch.testing.assert_close(logits(in_peft, ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(in_ours, ids), expected, rtol=0, atol=ATOL)
    with in_ours.disable_adapter():
        assert (logits(in_ours, ids) - expected).abs().max() > 1e-3  # the trained adapter matters
    q0 = in_ours.base_model.model.model.layers[0].self_attn.q_proj
    assert q0.r["default"] == sum(kept["model.layers.0.self_attn.q_proj.lora_E"])
    assert float(q0.ranknum["default"]) == RUN["init_r"]
