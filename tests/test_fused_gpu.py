"""The fused training path on a GPU: Triton kernels against their plain versions, and the fused
model against transformers' modules in bfloat16. Runs only where CUDA is available (the CPU suite
checks the same functions' plain versions exactly, and the kernels under Triton's interpreter:
tests/test_fused.py).

bfloat16 tolerances. Both paths round to bfloat16 at different points (the kernels keep float32
between the steps transformers rounds), so neither is "the" answer: each is compared with the same
computation in float32 (the model cast to float32, the same adapter weights), and the fused path
must be about as close to it as the plain path is: its error at most 1.5 times the plain path's
plus 2^-9 (one bfloat16 rounding), per adapter gradient and for the loss.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")

sys.path.insert(0, str(Path(__file__).parent))


def test_triton_kernels_equal_their_plain_versions_on_the_gpu():
    from kernel_cases import report, run

    assert report(run("cuda"))


def _model(dtype, quantized=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl import LoraConfig, get_peft_model

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to("cuda", dtype)
    if quantized:
        import bitsandbytes as bnb

        for module in list(base.model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          quant_type="nf4", device="cuda")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                 quant_type="nf4").to("cuda")
                    setattr(module, name, q)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def _step(model, batch, fused):
    from peftctl.adapters.lora.fused import disable_fused, enable_fused
    from peftctl.loss import loss_sum

    model.train()
    model.zero_grad()
    if fused:
        enable_fused(model)
    try:
        loss, n = loss_sum(model, batch)
        (loss / n).backward()
    finally:
        disable_fused(model)
    return float(loss / n), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(0, 1000, (4, 128), device="cuda")
    labels = ids.clone()
    labels[:, :16] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "qlora-nf4"])
def test_fused_model_is_as_accurate_as_the_module_graph_in_bfloat16(quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")
    batch = _batch()
    model = _model(torch.bfloat16, quantized)
    plain = _step(model, batch, fused=False)
    fast = _step(model, batch, fused=True)
    # The float32 reference: the same weights (a 4-bit base's dequantized values) computed in float32.
    model.float()
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.compute_dtype = torch.float32
    ref = _step(model, batch, fused=False)
    tol = 2.0**-9
    err_plain, err_fast = abs(plain[0] - ref[0]) / ref[0], abs(fast[0] - ref[0]) / ref[0]
    print(f"loss: plain {plain[0]:.6f} fused {fast[0]:.6f} float32 {ref[0]:.6f}")
    assert err_fast <= 1.5 * err_plain + tol
    worst = 0.0
    for k, g in ref[1].items():
        ep = float((plain[1][k] - g).norm() / g.norm())
        ef = float((fast[1][k] - g).norm() / g.norm())
        worst = max(worst, ef)
        assert ef <= 1.5 * ep + tol, (k, ef, ep)
    print(f"largest relative gradient error of the fused path against float32: {worst:.2e}")


def test_offloaded_checkpointing_on_the_gpu_gives_the_gradients_of_plain_checkpointing():
    """Inputs copied to pinned host memory on a side stream and back: the same loss (the forward
    is the same arithmetic) and gradients equal to attention's backward nondeterminism (its atomic
    float32 additions): 1e-3 relative."""
    from peftctl.kernels.offload import OffloadedCheckpoint
    from peftctl.train import budget

    batch = _batch()
    results = []
    for offload in (False, True):
        model = _model(torch.bfloat16)
        budget.apply(model, 3, offload=offload, device=torch.device("cuda"))
        offloader = model.base_model.model.model.layers[0]._gradient_checkpointing_func
        if offload:
            assert isinstance(offloader, OffloadedCheckpoint)
            offloader.min_bytes = 0  # this model's layer inputs are smaller than the default threshold
        results.append([_step(model, batch, fused=True) for _ in range(2)])
        if offload:
            assert offloader.waiting == 0
            assert offloader.copied_bytes == 2 * 3 * 4 * 128 * 256 * 2  # 2 steps, 3 layer inputs, bf16
    for (l0, g0), (l1, g1) in zip(*results, strict=True):
        assert l0 == l1
        for k in g0:
            assert float((g1[k] - g0[k]).norm() / g0[k].norm()) < 1e-3, k


def test_adapters_are_the_same_whether_the_base_is_loaded_on_the_gpu_or_the_cpu():
    """What makes FSDP (base in host memory, sharded afterwards) train the adapter one GPU trains."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl import LoraConfig, get_peft_model

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    made = []
    for device in ("cuda", "cpu"):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(device)
        torch.manual_seed(5)
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        made.append({k: v.cpu() for k, v in model.state_dict().items() if "lora_" in k})
    assert made[0].keys() == made[1].keys()
    assert all(torch.equal(made[0][k], made[1][k]) for k in made[0])


def test_the_fallback_switch_forces_the_plain_path():
    from peftctl.kernels.backend import use_triton

    x = torch.ones(2, device="cuda")
    assert use_triton(x)
    os.environ["PEFTCTL_TRITON"] = "0"
    try:
        assert not use_triton(x)
    finally:
        del os.environ["PEFTCTL_TRITON"]


def test_variable_length_attention_equals_attention_per_sequence():
    """PyTorch's variable-length flash attention (grouped-query, causal) against SDPA over each
    sequence in turn, forward and backward, bfloat16: both accumulate in float32 and round their
    outputs once to bfloat16 (2^-8 relative each), so 1.6e-2 (4 * 2^-8) on the Frobenius norm."""
    from peftctl.kernels import varlen

    if not varlen.available(torch.device("cuda")):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 357, 512, 1100], dtype=torch.int32, device="cuda")
    q = torch.randn(1100, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1100, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1100, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(1100, 8, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (lambda: varlen.varlen_attention(q, k, v, cu, 588, 0.125),
               lambda: varlen.per_sequence(q, k, v, cu, 0.125)):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1.6e-2


def test_prepare_with_pinned_copies_gives_the_same_batch():
    """`loss.prepare(pin=True)` (the loop's prefetch on a GPU): the host tensors go through pinned
    memory and asynchronous copies; the device batch and loss plan are exactly those of the plain
    copies (integer tensors: any difference is a wrong copy, not rounding)."""
    from peftctl.loss import prepare

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 256), generator=g)
    labels = ids.clone()
    labels[:, :100] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    device = torch.device("cuda")
    plain, plain_plan = prepare(batch, device)
    pinned, pinned_plan = prepare(batch, device, pin=True)
    torch.cuda.synchronize()
    assert plain.keys() == pinned.keys()
    assert all(torch.equal(plain[k], pinned[k]) for k in plain)
    assert pinned_plan.n_tokens == plain_plan.n_tokens
    assert torch.equal(pinned_plan.targets, plain_plan.targets) and torch.equal(pinned_plan.rows, plain_plan.rows)
