"""Training options that change what a run computes, checked by what they do to it end to end:
`train.gradient_checkpointing` (recomputes each layer, stores none of its activations, same
result), `train.max_grad_norm` (the applied update's norm, and the logged norm before clipping),
and the data order (each epoch every example once, a new seeded order each epoch).

Each test runs `peftctl train` in-process and watches the model through torch's global hooks
(module forward hooks, saved-tensor hooks): instruments on torch, nothing of peftctl replaced.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from clirun import run_json
from safetensors.torch import load_file
from torch import nn


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def global_hooks(pre=None, post=None, pack=None):
    """Forward pre/post hooks on every module, and a saved-tensor pack hook, for the block's duration."""
    handles = []
    if pre is not None:
        handles.append(nn.modules.module.register_module_forward_pre_hook(pre))
    if post is not None:
        # always_call: non-reentrant checkpointing stops a recomputation early by raising inside the
        # module call, which transformers 4.x's checkpoint wraps hooks and all; the post hook runs anyway.
        handles.append(nn.modules.module.register_module_forward_hook(post, always_call=True))
    saved = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x) if pack else contextlib.nullcontext()
    try:
        with saved:
            yield
    finally:
        for h in handles:
            h.remove()


def test_gradient_checkpointing_recomputes_each_layer_keeps_only_its_input_and_trains_the_same(
        make_recipe, tmp_path):
    """With `train.gradient_checkpointing: true` each decoder layer's attention runs twice per
    micro-batch (forward, and again in the backward pass) and autograd keeps nothing from inside a
    layer but the layer's input (non-reentrant checkpointing packs the rest with its own hooks,
    which take precedence over ours); without it, once, with all its activations kept. The losses
    and the trained adapter are the same. transformers 5 checkpoints a layer's forward (its hooks run
    once), 4.x the whole module call (its hooks run again in the recomputation): counted per call."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    steps, layers = 3, 2  # the tiny model has 2 decoder layers

    def train(checkpointing: bool):
        out = tmp_path / f"gc-{checkpointing}"
        count = {"attention": 0, "depth": 0, "calls": 0, "inputs": 0, "saved_inside": 0, "saved_outside": 0}

        def pre(module, args):
            if not module.training:  # the final evaluation runs in eval mode
                return
            if isinstance(module, LlamaAttention):
                count["attention"] += 1
            elif isinstance(module, LlamaDecoderLayer):
                count["depth"] += 1
                count["calls"] += 1
                count["inputs"] += args[0].numel() * args[0].element_size()

        def post(module, args, output):
            if module.training and isinstance(module, LlamaDecoderLayer):
                count["depth"] -= 1

        def pack(t):
            count["saved_inside" if count["depth"] else "saved_outside"] += t.numel() * t.element_size()
            return t

        recipe = make_recipe(out=str(out), train={"max_steps": steps, "log_every": 1, "save_every": None,
                                                  "gradient_checkpointing": checkpointing})
        with global_hooks(pre, post, pack):
            s = run_json("train", recipe)
        assert s["status"] == "completed"
        return count, load_file(out / "adapter_model.safetensors"), [m["loss"] for m in metrics(out) if "loss" in m]

    results = {checkpointing: train(checkpointing) for checkpointing in (False, True)}
    plain, ckpt = results[False][0], results[True][0]
    assert plain["attention"] == steps * layers and ckpt["attention"] == 2 * steps * layers
    # The layers' inputs of one forward pass: the same with and without checkpointing.
    assert plain["calls"] == steps * layers and ckpt["calls"] in (steps * layers, 2 * steps * layers)
    once = ckpt["inputs"] * steps * layers // ckpt["calls"]
    assert plain["inputs"] == once > 0
    # Without checkpointing a layer keeps far more than its input (q, k, v, attention weights, the
    # MLP's gate, up and activation at twice the hidden size, norms: > 4 hidden-sized tensors).
    assert plain["saved_inside"] > 4 * plain["inputs"]
    assert ckpt["saved_inside"] <= once
    assert plain["saved_outside"] > 0 and ckpt["saved_outside"] > 0  # the hook saw this run's autograd
    (_, a, la), (_, b, lb) = results[False], results[True]
    assert la == pytest.approx(lb, rel=1e-6)
    # The recomputed forward does the same float32 operations in the same order: same gradients
    # up to summation-order noise (the unit test's bound).
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_max_grad_norm_clips_the_applied_update_and_logs_the_norm_before_clipping(make_recipe, tmp_path):
    """Plain SGD (no momentum, no decay, constant lr): step 2's update is a2 - a1 = -lr × g, with g
    clipped to norm `max_grad_norm` when its norm is larger. The logged grad_norm is the norm before
    clipping (as transformers' Trainer logs it)."""
    lr, clip = 1.0, 0.05
    runs = {}
    for max_norm in (clip, None):
        out = tmp_path / f"clip-{max_norm}"
        run_json("train", make_recipe(out=str(out), train={
            "max_steps": 2, "save_every": 1, "log_every": 1, "optimizer": "sgd", "momentum": 0.0,
            "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0, "lr": lr, "max_grad_norm": max_norm}))
        a1 = load_file(out / "checkpoints" / "step-000001" / "adapter_model.safetensors")
        a2 = load_file(out / "checkpoints" / "step-000002" / "adapter_model.safetensors")
        update = torch.linalg.vector_norm(torch.cat([(a2[k].double() - a1[k].double()).flatten() for k in a1]))
        norms = [m["grad_norm"] for m in metrics(out) if "grad_norm" in m]
        runs[max_norm] = (float(update), norms)
    clipped_update, clipped_norms = runs[clip]
    free_update, free_norms = runs[None]
    # Both runs start from the same weights: step 1's gradient, and its logged norm, are the same.
    assert clipped_norms[0] == pytest.approx(free_norms[0], rel=1e-6)
    assert clipped_norms[1] > 4 * clip  # clipping acts at step 2, and the log shows the norm before it
    # Tolerance: a2 is rounded to float32 (half an ulp per element, ~4e-9 for weights ~0.1, over
    # 1792 elements: ~2e-7 absolute on a norm of 0.05), torch's clip divides by (norm + 1e-6), and
    # the norm is summed in float32 (~1e-7 relative): rel 1e-4 holds with a wide margin.
    assert clipped_update == pytest.approx(lr * clip, rel=1e-4)
    assert free_update == pytest.approx(lr * free_norms[1], rel=1e-4)  # unset: no clipping


def test_each_epoch_sees_every_example_once_in_a_new_order_and_the_log_counts_them(
        make_recipe, tmp_path, tiny_model_dir):
    """Two epochs of 48 examples in batches of 8. The rows the model trains on, epoch by epoch, are
    each a permutation of the training data (`peftctl data --json`); the two epochs' orders differ;
    the same seed repeats the order (into the second epoch), another seed changes it. What the
    run logs counts those rows: tokens seen, loss tokens, step 1's loss (the mean cross-entropy
    over the first batch's loss tokens, computed here with transformers), and a window of two
    steps logs the token-weighted mean of its steps. With save_every unset the run writes no
    checkpoint, not even for an evaluation that improved."""
    import math

    from transformers import AutoModelForCausalLM

    def trained_rows(out: str, seed: int, **train) -> tuple[list[tuple[int, ...]], object, dict]:
        recipe = make_recipe(out=str(tmp_path / out), train={"batch_size": 8, "save_every": None, "seed": seed,
                                                             "scheduler": "constant", **train})
        rows: list[tuple[int, ...]] = []

        def pre(module, args):
            if isinstance(module, nn.Embedding) and module.training:  # not the final evaluation
                for row in args[0].tolist():  # right-padded with the pad id (0)
                    while row and row[-1] == 0:
                        row.pop()
                    rows.append(tuple(row))

        with global_hooks(pre=pre):
            summary = run_json("train", recipe)
        return rows, recipe, summary

    rows, recipe, summary = trained_rows("a", 0, max_steps=None, epochs=2, log_every=1, eval_every=6)
    examples = run_json("data", recipe)["examples"]
    data = [tuple(e["input_ids"]) for e in examples]
    assert len(data) == 48 and len(set(data)) == 48  # distinct examples, so rows identify them
    assert len(rows) == 96
    first, second = rows[:48], rows[48:]
    assert sorted(first) == sorted(data) and sorted(second) == sorted(data)  # each exactly once
    assert first != data and second != first  # shuffled, and anew each epoch
    same, _, _ = trained_rows("b", 0, max_steps=7, log_every=2)
    assert same == rows[:56]  # the same seed: the same order
    assert trained_rows("c", 1, max_steps=2)[0] != rows[:16]  # another seed: another order

    labels = {tuple(e["input_ids"]): e["labels"] for e in examples}
    loss_tokens = {x: sum(y != -100 for y in labels[x][1:]) for x in data}  # position 0 predicts nothing
    assert summary["tokens_seen"] == 2 * sum(map(len, data))  # padding is not counted
    assert summary["loss_tokens_seen"] == 2 * sum(loss_tokens.values())
    logged = [m for m in metrics(tmp_path / "a") if "loss" in m]
    assert [m["loss_tokens"] for m in logged] == [sum(loss_tokens[x] for x in rows[8 * i: 8 * i + 8])
                                                  for i in range(12)]
    assert all(0 < a["elapsed_s"] < b["elapsed_s"] for a, b in zip(logged, logged[1:], strict=False))
    # Step 1 runs the base model (LoRA's B starts at zero): its loss, example by example, in float32.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = 0.0
    with torch.no_grad():
        for x in rows[:8]:
            logits = base(input_ids=torch.tensor([x])).logits[0, :-1]
            target = torch.tensor(labels[x][1:])
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
    # The run sums the same per-token terms in another order (chunked head): float32 rounding only.
    assert logged[0]["loss"] == pytest.approx(total / logged[0]["loss_tokens"], rel=1e-5)
    # Logging every 2 steps (run b, the same run up to step 7) gives the token-weighted means.
    windows = [m for m in metrics(tmp_path / "b") if "loss" in m]
    assert [m["step"] for m in windows] == [2, 4, 6, 7]
    for w, steps in zip(windows, [(1, 2), (3, 4), (5, 6), (7,)], strict=True):
        parts = [logged[s - 1] for s in steps]
        assert w["loss_tokens"] == sum(p["loss_tokens"] for p in parts)
        assert w["loss"] == pytest.approx(sum(p["loss"] * p["loss_tokens"] for p in parts) / w["loss_tokens"], rel=1e-6)
    evals = [m for m in metrics(tmp_path / "a") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [6, 12]
    assert all(m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12) for m in evals)
    assert not (tmp_path / "a" / "checkpoints").exists()  # save_every unset: none, even for a better eval


def test_data_stream_splits_each_epoch_between_processes_and_resumes_mid_epoch():
    """DataStream on 2 processes: per epoch each process takes every other example of a global
    micro-batch, every example is drawn exactly once per epoch (a micro-batch never crosses an
    epoch's end), a process with no share of the last one runs a stand-in of weight 0, and a
    stream rebuilt at a checkpoint's (epoch, position) continues exactly as the first one."""
    from peftctl.data import Example
    from peftctl.train.loop import DataStream

    def draws(n_examples, rank, n, **at):
        examples = [Example(input_ids=[i + 1, 7], labels=[i + 1, 7]) for i in range(n_examples)]
        stream = DataStream(examples, batch_size=2, seed=5, rank=rank, world=2, pad_id=0, **at)
        out = []
        for _ in range(n):
            mb = stream.next()
            out.append((stream.epoch, mb.weight, [int(x) - 1 for x in mb.batch["input_ids"][:, 0]]))
        return out, stream

    # 11 examples: global micro-batches of 4, 4 and 3 per epoch
    per_rank = [draws(11, rank, 9)[0] for rank in (0, 1)]
    assert [len(ids) for _, _, ids in per_rank[0]] == [2, 2, 2] * 3
    assert [len(ids) for _, _, ids in per_rank[1]] == [2, 2, 1] * 3
    orders = []
    for epoch in range(3):
        taken = [i for r in per_rank for e, _, ids in r if e == epoch for i in ids]
        assert sorted(taken) == list(range(11))  # each example once
        orders.append(taken)
    assert orders[0] != orders[1] != orders[2]
    # 9 examples: the last global micro-batch of an epoch has 1, so process 1 runs a stand-in
    (_, weight, _), = [d for d in draws(9, 1, 3)[0][2:]]
    assert weight == 0.0 and all(w == 1.0 for _, w, _ in draws(9, 0, 3)[0])
    # resumed at the (epoch, position) a checkpoint would hold after 4 draws
    first, stream = draws(11, 0, 4)
    rest, _ = draws(11, 0, 5, epoch=stream.epoch, position=stream.position)
    assert first + rest == per_rank[0]


def test_resume_applies_the_recipes_new_hyperparameters_and_clears_stale_temporaries(make_recipe, tmp_path):
    """A resumed recipe may change optimizer settings (README: "other changes ... are allowed");
    the optimizer state comes from the checkpoint, the settings from the recipe. With plain SGD,
    weight decay w adds lr × w × a to step 3's update, so two resumes of the same checkpoint
    that differ only in weight decay differ by exactly lr × Δw × a2. Resuming also deletes the
    hidden temporaries a killed checkpoint write leaves (`.NAME.tmp`, `.NAME.old`), nothing else."""
    lr = 0.1
    sgd = {"optimizer": "sgd", "momentum": 0.0, "scheduler": "constant", "warmup_steps": 0, "lr": lr,
           "weight_decay": 0.1, "max_grad_norm": None, "log_every": 1, "save_every": 2}
    first = tmp_path / "first"
    recipe = make_recipe(out=str(first), train={**sgd, "max_steps": 2})
    run_json("train", recipe)
    ckpts = first / "checkpoints"
    for name in (".step-000004.tmp", ".step-000002.old", ".keep"):
        (ckpts / name).mkdir()
        (ckpts / name / "file").write_text("x")
    same = run_json("train", recipe, "--resume", "auto", "--set", "train.max_steps=3")
    assert same["status"] == "completed" and same["steps"] == 3
    assert sorted(p.name for p in ckpts.iterdir()) == [".keep", "step-000002", "step-000003"]

    other = tmp_path / "other"
    run_json("train", recipe, "--resume", ckpts / "step-000002", "--set", "train.max_steps=3",
             "--set", f"output.dir={other}", "--set", "train.weight_decay=0.6")
    a2 = load_file(ckpts / "step-000002" / "adapter_model.safetensors")
    a3 = load_file(first / "adapter_model.safetensors")
    b3 = load_file(other / "adapter_model.safetensors")
    for k in a2:
        # float32 rounding of a3, b3 (~1e-8 for weights ~0.1) against a difference of ~5e-3
        torch.testing.assert_close(b3[k] - a3[k], -lr * 0.5 * a2[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_refused_before_any_work(make_recipe, tmp_path, monkeypatch, tracker):
    """Enabling a tracker whose package is missing is an input error, in a dry run too, and nothing
    is written. (A `None` in sys.modules is how Python marks a module as unavailable: imports fail
    and importlib.util.find_spec returns None.)"""
    from clirun import run

    monkeypatch.setitem(sys.modules, tracker, None)
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), tracking={tracker: True})
    for args in (["--dry-run"], []):
        r = run("train", recipe, *args, code=2)
        assert f"tracking.{tracker} is true but the {tracker} package is not installed" in r.stderr
    assert not out.exists()
