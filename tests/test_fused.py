"""The fused training path (`peftctl.kernels`, `adapters.lora.fused`) against the plain computation.

On the CPU the fused functions run their plain-PyTorch versions; the Triton kernels are checked
under Triton's interpreter in a child process. tests/test_fused_gpu.py repeats the comparisons on
a GPU in bfloat16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clirun import run, run_json

from peftctl import LoraConfig, get_peft_model
from peftctl.adapters.lora import fused
from peftctl.kernels.lora import Projection, lora_mlp, project
from peftctl.kernels.norm import rms_norm
from peftctl.kernels.offload import OffloadedCheckpoint
from peftctl.kernels.rope import apply_rope
from peftctl.kernels.swiglu import swiglu, swiglu_backward_
from peftctl.loss import loss_plan, loss_sum, prepare

HERE = Path(__file__).parent


def _grads(fn, *tensors):
    out = fn(*tensors)
    return out.detach(), torch.autograd.grad(out, tensors, torch.ones_like(out) if out.dim() else None)


def test_kernels_plain_versions_equal_the_formulas_in_float64():
    """Each fused function's plain path against the textbook formula under autograd, in float64,
    where both are exact to rounding (1e-12 relative)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 24, dtype=torch.float64, requires_grad=True)
    w = 1 + 0.1 * torch.randn(24, dtype=torch.float64)

    def ref_norm(x):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    dy = torch.randn(4, 5, 24, dtype=torch.float64)
    y, (gx,) = _grads(lambda x: (rms_norm(x, w, 1e-6) * dy).sum(), x)
    yr, (gr,) = _grads(lambda x: (ref_norm(x) * dy).sum(), x)
    assert torch.allclose(y, yr, rtol=1e-12) and torch.allclose(gx, gr, rtol=1e-10, atol=1e-12)

    g, u, dp = (torch.randn(6, 40, dtype=torch.float64) for _ in range(3))
    gr_, ur_ = g.clone().requires_grad_(), u.clone().requires_grad_()
    (F.silu(gr_) * ur_).backward(dp)
    assert torch.allclose(swiglu(g, u), F.silu(g) * u, rtol=1e-12)
    dg, du = swiglu_backward_(dp, g.clone(), u.clone())
    assert torch.allclose(dg, gr_.grad, rtol=1e-10, atol=1e-12) and torch.allclose(du, ur_.grad, rtol=1e-10, atol=1e-12)

    # RoPE against transformers' own apply_rotary_pos_emb (which works on (batch, heads, seq, dim)).
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = torch.randn(2, 7, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    do = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    o, (gq,) = _grads(lambda q: (apply_rope(q, cos, sin) * do).sum(), q)
    oref, (gqr,) = _grads(lambda q: (apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)[0]
                                     .transpose(1, 2) * do).sum(), q)
    assert torch.allclose(o, oref, rtol=1e-12) and torch.allclose(gq, gqr, rtol=1e-10, atol=1e-12)


def _proj(n_in, n_out, r, bias=False, adapted=True):
    w = torch.randn(n_out, n_in, dtype=torch.float64) / n_in**0.5
    b = torch.randn(n_out, dtype=torch.float64) if bias else None
    if not adapted:
        return Projection(w, b)
    a = torch.randn(r, n_in, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(n_out, r, dtype=torch.float64, requires_grad=True)
    return Projection(w, b, None, a, bb, 0.7)


def _plain(p, x):
    y = F.linear(x, p.weight, p.bias)
    return y if not p.adapted else y + F.linear(F.linear(x, p.lora_A) * p.scale, p.lora_B)


def test_lora_projections_and_mlp_equal_the_module_graph_in_float64():
    """Shared-input projections (one adapted with a bias, one plain, one adapted) and the MLP:
    outputs and the gradients of x, A and B as autograd over the plain formula gives them."""
    torch.manual_seed(1)
    projs = (_proj(16, 12, 3, bias=True), _proj(16, 8, 3, adapted=False), _proj(16, 8, 2))
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    adapters = [t for p in projs if p.adapted for t in (p.lora_A, p.lora_B)]
    weights = [torch.randn(2, 5, p.weight.shape[0], dtype=torch.float64) for p in projs]

    def total(outs):
        return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))

    ours = torch.autograd.grad(total(project(x, projs)), [x, *adapters])
    ref = torch.autograd.grad(total([_plain(p, x) for p in projs]), [x, *adapters])
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)

    gate, up, down = _proj(16, 24, 4), _proj(16, 24, 4), _proj(24, 16, 2)
    params = [x] + [t for p in (gate, up, down) for t in (p.lora_A, p.lora_B)]
    wy = torch.randn(2, 5, 16, dtype=torch.float64)
    ours = torch.autograd.grad((lora_mlp(x, gate, up, down) * wy).sum(), params)
    ref = torch.autograd.grad((_plain(down, F.silu(_plain(gate, x)) * _plain(up, x)) * wy).sum(), params)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)")
def test_triton_kernels_under_the_interpreter_equal_the_plain_versions():
    """The Triton kernels (run by Triton's CPU interpreter) against the plain versions, float32 and
    bfloat16, forward and backward: bounds derived in tests/kernel_cases.py."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PEFTCTL_TRITON": "interpret",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(HERE / "kernel_cases.py"), "cpu"], capture_output=True, text=True,
                       env=env, timeout=600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert p.stdout.count("\n") == 22  # every comparison ran


def _model(tiny_llama, dtype, **lora):
    torch.manual_seed(0)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | lora
    return get_peft_model(tiny_llama().to(dtype), LoraConfig(**cfg))


def _step(model, batch):
    model.zero_grad()
    loss, _ = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _batch(n=3, length=17, masked=4):
    torch.manual_seed(2)
    ids = torch.randint(0, 320, (n, length))
    labels = ids.clone()
    labels[:, :masked] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _compare(model, batch, rtol, monkeypatch=None, skip_norms=False):
    model.train()
    plain = _step(model, batch)
    if skip_norms:
        monkeypatch.setattr(fused, "_FORWARDS", fused._FORWARDS[1:])
    counts = fused.enable_fused(model)
    try:
        fast = _step(model, batch)
    finally:
        fused.disable_fused(model)
    assert torch.allclose(fast[0], plain[0], rtol=rtol), (fast[0], plain[0])
    for k, g in plain[1].items():
        err = float((fast[1][k] - g).norm() / g.norm())
        assert err < rtol, (k, err)
    return counts


def test_fused_model_equals_the_module_graph(tiny_llama, monkeypatch):
    """A tiny Llama with LoRA on every linear layer: loss and every adapter gradient, fused against
    transformers' modules. float64 without the norms: exact to rounding (1e-10; transformers computes
    its RMSNorm in float32 even for a float64 model, which the fused norm does not). float32 with
    everything: both sides in float32 in another order, through ~10 layers of products; 1e-4."""
    batch = _batch()
    counts = _compare(_model(tiny_llama, torch.float32), batch, 1e-4)
    assert counts == {"rms_norm": 5, "mlp": 2, "attention": 2}
    counts = _compare(_model(tiny_llama, torch.float64), batch, 1e-10, monkeypatch, skip_norms=True)
    assert counts == {"mlp": 2, "attention": 2}


def test_fused_model_under_qlora_equals_the_module_graph(tiny_llama):
    """Over bitsandbytes 4-bit linears (dequantized per product, as bitsandbytes computes them)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peftctl.models import quantize_skeleton  # noqa: F401  (the same layer types a run gets)

    model = tiny_llama()
    for module in list(model.model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
                setattr(module, child_name, q)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    quantized = [m for m in peft.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 14
    x = torch.randn(2, 3, 64)
    assert fused.projection(peft.base_model.model.model.layers[0].mlp.gate_proj, x).quant_state is not None
    # bitsandbytes dequantizes and multiplies in float32 here, as the fused path does: 1e-5.
    _compare(peft, _batch(), 1e-5)


def test_fused_forwards_fall_back_where_they_would_compute_something_else(tiny_llama):
    """Dropout in training, DoRA, two active adapters, a mixed batch, a merged or disabled adapter:
    the module's own forward runs (same outputs as without the fused forwards)."""
    batch = _batch()
    cases = {
        "dropout": _model(tiny_llama, torch.float64, lora_dropout=0.1),
        "dora": _model(tiny_llama, torch.float64, use_dora=True),
        "lora_bias": _model(tiny_llama, torch.float64, lora_bias=True),
    }
    two = _model(tiny_llama, torch.float64)
    two.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    two.base_model.set_adapter(["default", "other"])
    cases["two adapters"] = two
    x = torch.randn(1, 2, 64, dtype=torch.float64)
    for what, model in cases.items():
        model.train()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert fused.projection(layer, x) is None, what
        torch.manual_seed(3)
        plain = _step(model, batch)
        fused.enable_fused(model)
        torch.manual_seed(3)  # the same dropout masks
        fast = _step(model, batch)
        fused.disable_fused(model)
        assert torch.allclose(fast[0], plain[0], rtol=1e-6), what  # only the (fused) norms differ: float32 inside
    model = _model(tiny_llama, torch.float64)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.merge_adapter()
    p = fused.projection(layer, x)
    assert p is not None and not p.adapted  # merged: the base weight holds the adapter
    model.unmerge_adapter()
    with model.disable_adapter():
        p = fused.projection(layer, x)
        assert p is not None and not p.adapted
    model.eval()  # dropout off in eval: fused again
    assert fused.projection(cases["dropout"].eval().base_model.model.model.layers[0].self_attn.q_proj, x).adapted


def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing(tiny_llama):
    """`OffloadedCheckpoint` (forced on the CPU: host copies are clones) around every decoder layer:
    the same loss and gradients as checkpointing without it (bitwise: the same arithmetic), every
    held input taken back by the backward, host buffers reused from step to step."""
    from peftctl.train import budget

    batch = _batch()
    results = []
    for offload in (False, True):
        model = _model(tiny_llama, torch.float32)
        budget.apply(model, 2, offload=False, device=torch.device("cpu"))
        model.train()
        if offload:
            offloader = OffloadedCheckpoint("cpu", min_bytes=0, force=True)
            for layer in model.base_model.model.model.layers:
                layer._gradient_checkpointing_func = offloader
        steps, pooled = [], []
        for _ in range(2):
            steps.append(_step(model, batch))
            if offload:
                pooled.append(sum(len(v) for v in offloader.pool.values()))
        results.append(steps)
        if offload:
            assert offloader.waiting == 0
            assert offloader.copied_bytes >= 2 * 2 * 3 * 17 * 64 * 4  # two layer inputs per step, two steps
            # Host buffers are reused: the second step allocates none. (How many tensors a checkpoint
            # saves per layer depends on the torch version: 2.13 saves one input per layer, 2.11 two.)
            assert pooled[0] >= 2 and pooled[1] == pooled[0], pooled
    for (l0, g0), (l1, g1) in zip(*results, strict=True):
        assert torch.equal(l0, l1)
        assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_loss_plan_on_the_host_gives_the_same_loss():
    """`prepare` computes the loss positions on the host; with most positions carrying loss the
    loss takes every row (no gather), with masked prompts only the loss rows. An all-ones mask is
    dropped."""
    full = _batch(masked=0)
    plan = loss_plan(full["labels"])
    assert plan.rows is None and plan.n_tokens == 3 * 16
    masked = _batch(masked=9)
    plan = loss_plan(masked["labels"])
    assert plan.rows is not None and plan.n_tokens == 3 * (16 - 8) == len(plan.rows)
    moved, _ = prepare(masked, torch.device("cpu"))
    assert "attention_mask" not in moved
    padded = dict(masked, attention_mask=masked["attention_mask"].clone())
    padded["attention_mask"][0, -2:] = 0
    assert "attention_mask" in prepare(padded, torch.device("cpu"))[0]


def test_memory_budget_plan_picks_the_fewest_checkpointed_layers():
    from peftctl.memory import Parts, plan_budget

    parts = Parts(weights={"bfloat16": 1000}, adapter=10, states=20, logits=30, layers=4, tokens=10, per_layer=10,
                  layer_input=5, always=7, fused=True)
    fixed = 1000 + 2 * 10 + 20 + 30 + 7
    assert parts.total(0) == fixed + 4 * 10 * 10
    assert plan_budget(parts, fixed + 400)["checkpoint_layers"] == 0
    chosen = plan_budget(parts, fixed + 3 * 100 + 5)  # one layer checkpointed, its input kept
    assert (chosen["checkpoint_layers"], chosen["offload"], chosen["fits"]) == (1, False, True)
    chosen = plan_budget(parts, fixed + 3 * 100)  # the same with its input in host memory
    assert (chosen["checkpoint_layers"], chosen["offload"]) == (1, True)
    # The last layer unchecked costs no more than the recompute of a checkpointed one (its backward
    # frees its activations before any recompute): all but one checkpointed is the same peak as all.
    chosen = plan_budget(parts, fixed + 100 + 3 * 5)
    assert (chosen["checkpoint_layers"], chosen["offload"]) == (3, False)
    chosen = plan_budget(parts, fixed + 100)
    assert (chosen["checkpoint_layers"], chosen["offload"], chosen["fits"]) == (3, True, True)
    chosen = plan_budget(parts, fixed + 99)
    assert (chosen["checkpoint_layers"], chosen["offload"], chosen["fits"]) == (4, True, False)


def test_memory_estimate_counts_fused_blocks_only_where_the_fused_forwards_run(tiny_llama):
    """The fused projections compute plain LoRA linears only (`fused.projection`); blocks adapted
    by another method (IA3, LoHa), or by DoRA, run their own forwards, so the estimate with kernels
    on is the one without. Kept adapter weights (LoHa's and LoKr's ΔW, `saved_weights`) count per
    layer: all of them without checkpointing, the unchecked layers' (or the recomputed one's) with
    the first k layers checkpointed."""
    from peftctl import IA3Config, LoHaConfig
    from peftctl.memory import Parts, Workload, estimate

    work = Workload(2, 16)

    def est(model, fused_on, **kw):
        return estimate(model, model.config, workload=work, gradient_checkpointing=False, optimizer="adamw",
                        fused=fused_on, **kw)

    lora = _model(tiny_llama, torch.float32)
    assert est(lora, True)["fused"] and est(lora, True)["activations"] < est(lora, False)["activations"]
    others = {"dora": _model(tiny_llama, torch.float32, use_dora=True),
              "ia3": get_peft_model(tiny_llama(), IA3Config(target_modules="all-linear")),
              "loha": get_peft_model(tiny_llama(), LoHaConfig(r=4, target_modules="all-linear"))}
    for what, model in others.items():
        on, off = est(model, True), est(model, False)
        assert not on["fused"] and on["activations"] == off["activations"], what
    # 4 layers of 10 tokens x 10 bytes, 10 bytes of kept weights each, inputs of 5, 7 always kept.
    parts = Parts(weights={}, adapter=0, states=0, logits=0, layers=4, tokens=10, per_layer=10, layer_input=5,
                  always=7, fused=False, kept_weights=40)
    assert parts.activations(0) == 4 * 10 * 10 + 40 + 7
    assert parts.activations(2) == 2 * (10 * 10 + 10) + 2 * 5 + 7
    assert parts.activations(4) == (10 * 10 + 10) + 4 * 5 + 7


def test_train_with_fused_kernels_and_a_memory_budget(make_recipe, tmp_path):
    """End to end on the CPU: `train.kernels: true` gives the loss curve of `false` (float32, 1e-4),
    and a budget between the estimates with and without checkpointing checkpoints some layers; the
    dry run shows the same plan that the run records in summary.json."""
    recipe = make_recipe(train={"max_steps": 3, "batch_size": 2, "log_every": 1, "save_every": None, "lr": 1e-3},
                         model={"dtype": "float32"})
    curves = {}
    for kernels in ("false", "true"):
        out = tmp_path / kernels
        summary = run_json("train", recipe, "--set", f"output.dir={out}", "--set", f"train.kernels={kernels}")
        assert (summary["kernels"] is None) == (kernels == "false")
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves[kernels] = [m["loss"] for m in lines if "loss" in m]
    assert summary["kernels"] == {"rms_norm": 5, "mlp": 2, "attention": 2}
    assert len(curves["true"]) == 3
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-4)

    plan = run_json("train", recipe, "--dry-run", "--set", "train.kernels=true")["memory_estimate_bytes"]
    budget = (plan["total"] - plan["activations"] + (plan["activations_with_checkpointing"]
                                                     + plan["activations_without_checkpointing"]) // 2)
    sets = ["--set", "train.kernels=true", "--set", f"train.memory_budget={budget / 2**30!r}"]
    dry = run_json("train", recipe, "--dry-run", *sets)
    chosen = dry["memory_plan"]
    assert chosen["fits"] and 0 < chosen["checkpoint_layers"] < 2 and not chosen["offload"]
    assert dry["memory_estimate_bytes"]["checkpoint_layers"] == chosen["checkpoint_layers"]
    assert "budget" in run("train", recipe, "--dry-run", *sets).stdout
    summary = run_json("train", recipe, "--set", f"output.dir={tmp_path / 'budget'}", *sets)
    assert summary["memory_plan"] == chosen
    refused = run("train", recipe, "--set", "train.memory_budget=8", "--set", "train.gradient_checkpointing=true",
                  code=2)
    assert "memory_budget" in refused.stderr


def test_packed_batches_with_boundaries_give_the_unpacked_loss_and_gradients(chat_data, tiny_model_dir):
    """The "cu_seqlens" packed layout (one row, boundaries computed at collation, no mask) through
    the fused attention (`kernels.varlen`; on the CPU SDPA per sequence): the loss and adapter
    gradients of the same examples unpacked (float32: 1e-5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftctl import data as data_lib
    from peftctl.data.packing import FUSED_VARLEN
    from peftctl.recipe import DataSection

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = dict(train=str(chat_data[1]), max_length=256, cache=False)
    plain = list(data_lib.build(DataSection(**cfg), tok).train)[:12]
    packed = data_lib.build(DataSection(**cfg, packing=True), tok, attention=FUSED_VARLEN).train
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert fused.varlen_supported(model.get_base_model(), torch.device("cpu"))
    model.train()
    # The packed sequences that hold exactly the first examples' token streams, in their order.
    seqs = [packed[i] for i in range(len(packed))]
    batch = data_lib.collate(seqs[:2], tok.pad_token_id)
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["attention_mask"].shape == (1, 1, 1, 1)
    n_seq = len(batch["cu_seq_lens_q"]) - 1
    starts = batch["cu_seq_lens_q"].tolist()
    ids = batch["input_ids"][0].tolist()
    examples = [e for e in data_lib.build(DataSection(**cfg), tok).train]
    by_ids = {tuple(e.input_ids): e for e in examples}
    members = [by_ids[tuple(ids[a:b])] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert len(members) == n_seq > 2 and plain  # the packed row holds whole examples
    unpacked = data_lib.collate(members, tok.pad_token_id)
    unpacked["labels"][:, 0] = -100  # a packed example's first token carries no loss either

    def step(b, with_fused):
        model.zero_grad()
        if with_fused:
            fused.enable_fused(model)
        try:
            moved, plan = prepare(b, torch.device("cpu"))
            loss, n = loss_sum(model, moved, plan)
            loss.backward()
        finally:
            fused.disable_fused(model)
        return float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    lp, n_p, gp = step(batch, True)
    lu, n_u, gu = step(unpacked, False)
    assert n_p == n_u
    assert lp == pytest.approx(lu, rel=1e-5)
    for k, g in gu.items():
        assert float((gp[k] - g).norm() / g.norm()) < 1e-4, k
