"""The training loop end to end on the tiny model: checkpoints and exact resume after a real
SIGKILL, signals, divergence, early stopping, accumulation, optimizers, precision, dry run, report."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clirun import gloo_env, run, run_json
from safetensors.torch import load_file


def env() -> dict[str, str]:
    # Read when a process starts, not at import: conftest's session fixture points PEFTCTL_CACHE at
    # a private cache only after this module is imported (the user's cache stays untouched).
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftctl", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter_model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    # Complete lines only: while a run writes, the last one may be half written.
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}):\n{err[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# Dropout on, so that exact resume also needs the random generators restored.
LONG = {"max_steps": 40, "save_every": 4, "keep_checkpoints": 2, "log_every": 1, "eval_every": 10}


def test_sigkill_then_resume_equals_an_uninterrupted_run_bit_for_bit(make_recipe, tmp_path):
    recipe = make_recipe(out=str(tmp_path / "killed"), train=LONG, adapter={"lora_dropout": 0.1})
    killed = tmp_path / "killed"
    proc = spawn("train", recipe)
    ckpts = killed / "checkpoints"
    wait_for(lambda: ckpts.is_dir() and len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # it really died mid-run

    resumed = run_json("train", recipe, "--resume", "auto")
    assert resumed["status"] == "completed" and resumed["steps"] == 40
    assert resumed["resumed_from"] and "step-0000" in resumed["resumed_from"]

    whole = tmp_path / "whole"
    run_json("train", make_recipe(out=str(whole), train=LONG, adapter={"lora_dropout": 0.1}))
    a, b = adapter(killed), adapter(whole)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted one"
    # The metrics read as one run: each step once, the same losses.
    steps = [m["step"] for m in metrics(killed) if "loss" in m]
    assert steps == list(range(1, 41))
    assert losses(killed) == losses(whole)
    assert [m["lr"] for m in metrics(killed) if "loss" in m] == [m["lr"] for m in metrics(whole) if "loss" in m]
    # keep_checkpoints: the last two (plus the best eval's), and no temporary folder left over
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    best = f"step-{summary(killed)['best_eval']['step']:06d}"
    assert set(names) == {"step-000036", "step-000040", best}


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(make_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 100000, "save_every": None, "log_every": 1})
    proc = spawn("train", recipe, "--json", "--set", "train.eval_every=1000", "--set", "eval.max_new_tokens=4")
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    s = summary(out)
    assert s["status"] == "interrupted" and s["stop_reason"] == "SIGTERM"
    assert json.loads(stdout) == s  # --json still prints the summary
    assert f"interrupted by SIGTERM at step {s['steps']}" in stderr and "Traceback" not in stderr
    # the hint is the whole command, the overrides included (issue 15)
    assert (f"continue with: peftctl train {recipe} --set train.eval_every=1000 --set eval.max_new_tokens=4 "
            "--resume auto") in stderr
    assert s["last_checkpoint"] == f"checkpoints/step-{s['steps']:06d}"
    state = json.loads((out / s["last_checkpoint"] / "peftctl_state.json").read_text())
    assert state["step"] == s["steps"] and state["position"] == (4 * s["steps"] - 1) % 48 + 1
    # it continues from there
    res = run_json("train", recipe, "--resume", "auto", "--set", f"train.max_steps={s['steps'] + 2}")
    assert res["status"] == "completed" and res["steps"] == s["steps"] + 2


def test_a_second_signal_stops_at_once_but_a_repeat_of_the_first_does_not():
    from peftctl.train.signals import SAME_EVENT_S, StopNow, StopRequest

    # The handler before the block: Python's default, or SIG_IGN when the suite was started in the
    # background by a non-interactive shell (which ignores SIGINT for its children).
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks
        os.kill(os.getpid(), signal.SIGTERM)  # the same event, forwarded by a launcher
        time.sleep(SAME_EVENT_S)
        with pytest.raises(StopNow) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stopped.value.signum == signal.SIGINT  # the exit code (130) comes from it
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_refuses_a_recipe_that_became_another_run(make_recipe, tmp_path, chat_data):
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 4, "save_every": 2})
    run_json("train", recipe)
    before = (out / "metrics.jsonl").read_text()
    r = run("train", recipe, "--resume", "auto", "--set", "adapter.r=8", "--set", "train.seed=3", code=2)
    assert "adapter.r: 4 -> 8" in r.stderr and "train.seed: 0 -> 3" in r.stderr
    changed = tmp_path / "train.jsonl"
    changed.write_text(chat_data[0].read_text().replace("2", "3"))
    r = run("train", recipe, "--resume", "auto", "--set", f"data.train={changed}", code=2)
    assert "data.train" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before  # refused: nothing touched
    # without --resume a used folder is refused, and the message says how to resume
    r = run("train", recipe, code=2)
    assert "not empty" in r.stderr and "--resume auto" in r.stderr
    # changes that keep it the same run (more steps, the same data elsewhere) are fine, and said
    moved = tmp_path / "moved.jsonl"
    moved.write_text(chat_data[0].read_text())
    r = run("train", recipe, "--resume", "auto", "--set", "train.max_steps=6", "--set", f"data.train={moved}")
    assert "train.max_steps: 4 -> 6" in r.stderr and "(same content)" in r.stderr
    assert summary(out)["steps"] == 6
    # going back to an older checkpoint abandons the later ones
    r = run("train", recipe, "--resume", out / "checkpoints" / "step-000004", "--set", "train.max_steps=6")
    assert "removed the checkpoints after step 4: step-000006" in r.stderr
    assert [m["step"] for m in metrics(out) if "loss" in m] == [2, 4, 6]


def test_checkpoints_with_the_old_state_file_name_still_resume_exactly(make_recipe, tmp_path):
    """Earlier versions named the state file trainer_state.json (Hugging Face Trainer's name, another
    schema): such checkpoints are found by --resume auto and by path, and resume bit for bit."""
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 4, "save_every": 2, "log_every": 1},
                         adapter={"lora_dropout": 0.1})
    run_json("train", recipe)
    whole = adapter(out)
    ckpts = [out / "checkpoints" / "step-000002", out / "checkpoints" / "step-000004"]
    for ckpt in ckpts:  # what an earlier version wrote
        assert not (ckpt / "trainer_state.json").exists()
        os.replace(ckpt / "peftctl_state.json", ckpt / "trainer_state.json")
    r = run("train", recipe, "--resume", "auto")  # found (else: "the run completed without checkpoints")
    assert "already finished (it completed 4 steps" in r.stderr
    r = run("train", recipe, "--resume", ckpts[0])
    assert "removed the checkpoints after step 2: step-000004" in r.stderr  # an old-name one, too
    b = adapter(out)
    assert all(torch.equal(whole[k], b[k]) for k in whole), "resumed adapter differs from the uninterrupted one"
    assert (ckpts[1] / "peftctl_state.json").is_file() and not (ckpts[1] / "trainer_state.json").exists()


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(make_recipe, tmp_path):
    out = tmp_path / "run"
    # float16 and a learning rate of 1e4: step 1 is fine, its update overflows the activations.
    recipe = make_recipe(out=str(out), model={"dtype": "float16"},
                         train={"max_steps": 20, "save_every": 1, "lr": 1e4, "skip_nonfinite_steps": 1})
    r = run("train", recipe, code=1)
    s = summary(out)
    assert s["status"] == "diverged" and s["skipped_steps"] == 1 and s["steps"] == 2
    assert "training diverged at step 3: the loss is not finite" in r.stderr and "Traceback" not in r.stderr
    assert [m for m in metrics(out) if "skipped" in m] == [{"step": 2, "skipped": "loss is not finite"}]
    assert f"last checkpoint {out / 'checkpoints' / 'step-000002'}" in r.stderr
    for step in (1, 2):  # the skipped step changed nothing
        weights = load_file(out / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter_model.safetensors").exists()


def test_early_stopping_keeps_the_best_checkpoint(make_recipe, tmp_path):
    out = tmp_path / "run"
    # A threshold no eval can beat: the first eval stays the best, two more and the run stops.
    recipe = make_recipe(out=str(out), train={"max_steps": 50, "eval_every": 2, "early_stopping_patience": 2,
                                              "early_stopping_threshold": 100.0, "save_every": None,
                                              "load_best_at_end": True})
    s = run_json("train", recipe)
    assert s["status"] == "completed" and s["stop_reason"] == "early_stopping" and s["steps"] == 6
    assert s["best_eval"]["step"] == 2 and s["best_eval"]["checkpoint"] == "checkpoints/step-000002"
    best = adapter(out / "checkpoints" / "step-000002")
    final = adapter(out)
    assert all(torch.equal(best[k], final[k]) for k in best)  # load_best_at_end
    assert [m["step"] for m in metrics(out) if "eval_loss" in m] == [2, 4, 6]
    # final_eval is the run's adapter's evaluation: the best one's, not the last step's
    assert s["final_eval"]["step"] == 2 and s["final_eval"]["eval_loss"] == s["best_eval"]["eval_loss"]


def test_grad_accumulation_equals_the_large_batch(make_recipe, tmp_path):
    """4 examples per step as 1×4, 2×2 and 4×1: the same losses and adapter (up to float rounding)."""
    results = {}
    for bs, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{bs}"
        run_json("train", make_recipe(out=str(out), train={"max_steps": 4, "batch_size": bs, "grad_accum": accum,
                                                           "log_every": 1, "save_every": None}))
        results[bs] = (losses(out), adapter(out))
    ref_loss, ref = results[4]
    for bs in (2, 1):
        loss, weights = results[bs]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert all(torch.allclose(weights[k], ref[k], atol=1e-6) for k in ref)


def test_dry_run_plans_without_writing(make_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": None, "epochs": 2, "batch_size": 4, "grad_accum": 2})
    p = run_json("train", recipe, "--dry-run", "--num-processes", "2")
    assert p["dry_run"] and p["steps"] == 6 and p["global_batch"] == 16 and p["epochs"] == 2.0
    assert p["trainable_params"] == 1792 and p["num_processes"] == 2
    assert p["checkpoints"] == 1  # save_every 500 over 6 steps: the one at the end
    assert run_json("train", recipe, "--dry-run", "--set", "train.save_every=null")["checkpoints"] == 0
    assert p["tokens"] > 0 and p["memory_estimate_bytes"]["total"] > p["memory_estimate_bytes"]["base_weights"] > 0
    assert not out.exists()
    text = run("train", recipe, "--dry-run").stdout
    assert "steps" in text and "memory" in text and "\x1b[" not in text  # not a terminal: no colours
    r = run("train", make_recipe(out=str(out), data={"max_length": 2}), "--dry-run", code=2)
    assert "data.max_length" in r.stderr


def test_optimizers_schedules_precision_and_checkpointing_train(make_recipe, tmp_path):
    """Every optimizer and schedule, float16 with loss scaling, gradient checkpointing: each trains."""
    cases = [
        {"optimizer": "adamw_8bit", "scheduler": "linear", "warmup_steps": 0, "warmup_ratio": 0.5},
        {"optimizer": "paged_adamw_8bit", "scheduler": "constant"},
        {"optimizer": "paged_adamw_32bit", "scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.5},
        {"optimizer": "adafactor", "lr": 0.05},
        {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "loraplus_lr_ratio": 4.0, "weight_decay": 0.1},
    ]
    base = run_json("eval", make_recipe(eval={"exact_match": False}), "--base")["eval_loss"]
    for i, train in enumerate(cases):
        s = run_json("train", make_recipe(out=str(tmp_path / f"r{i}"), train={"max_steps": 4, "log_every": 1, **train}))
        assert s["final_eval"]["eval_loss"] < base - 0.01, (train, s["final_eval"], base)
    last = [m for m in metrics(tmp_path / "r2") if "loss" in m]
    # cosine_with_min_lr, warmup 1 of 4 steps: step 4 uses min + (1 - min)·½(1 + cos(π·2/3)), and
    # lr × min_lr_ratio is reached when it ends
    assert last[-1]["lr"] == pytest.approx(5e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 3))))

    out = tmp_path / "fp16"
    s = run_json("train", make_recipe(out=str(out), model={"dtype": "float16"},
                                      train={"max_steps": 4, "save_every": 2, "gradient_checkpointing": True}))
    assert s["status"] == "completed"
    assert (out / "checkpoints" / "step-000004" / "scaler.pt").exists()


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_llama):
    from tiny import checkpointing_runs

    from peftctl import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    calls, grads = checkpointing_runs(
        lambda: get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False)), batch)
    assert calls == [1, 2]  # the layer ran again in the backward pass
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_param_groups_lora_plus_and_no_decay_on_biases_and_norms():
    from types import SimpleNamespace

    from torch import nn

    from peftctl.train.optim import lr_factor, param_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.proj = nn.Linear(4, 4)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 4, bias=False)})

    cfg = SimpleNamespace(lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16.0)
    block = Block()
    groups = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in param_groups(block, cfg)}
    assert groups[(1e-3, 0.0)] == {id(block.norm.weight), id(block.norm.bias), id(block.proj.bias)}
    assert groups[(1e-3, 0.1)] == {id(block.proj.weight), id(block.lora_A["default"].weight)}
    assert groups[(16e-3, 0.1)] == {id(block.lora_B["default"].weight)}
    # schedules against their formulas
    assert lr_factor(0, 10, 2, "cosine") == 0.5 and lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine_with_min_lr", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(10, 10, 2, "cosine_with_min_lr", 0.2) == pytest.approx(0.2)


def test_report_draws_the_curves(make_recipe, tmp_path):
    out = tmp_path / "run"
    run_json("train", make_recipe(out=str(out), train={"max_steps": 6, "eval_every": 2, "log_every": 1}))
    res = run_json("report", out)
    assert [x for x, _ in res["loss"]] == [1, 2, 3, 4, 5, 6] and [x for x, _ in res["eval_loss"]] == [2, 4, 6]
    assert "* train loss" in res["chart"] and "o eval loss" in res["chart"]
    assert res["summary"]["status"] == "completed"
    text = run("report", out, "--no-image").stdout
    assert "completed, 6 steps" in text and "* train loss" in text
    if importlib.util.find_spec("matplotlib") is None:
        assert res["image"] is None
        pytest.skip("matplotlib is not installed: no image to check")
    assert Path(res["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run("report", tmp_path, code=2)  # not a run folder


def test_tensorboard_and_mlflow_get_the_metrics(make_recipe, tmp_path):
    missing = [m for m in ("tensorboard", "mlflow") if importlib.util.find_spec(m) is None]
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 4, "log_every": 2, "eval_every": 2},
                         tracking={"tensorboard": True, "mlflow": True})
    if missing:  # enabled but not installed: refused up front, nothing written
        r = run("train", recipe, code=2)
        assert f"tracking.{missing[0]} is true but the {missing[0]} package is not installed" in r.stderr
        assert not out.exists()
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[test]' brings them)")
    s = run_json("train", recipe)
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([e["eval_loss"] for e in
                                                                            [m for m in metrics(out) if "eval_loss" in m]])
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    history = client.get_metric_history(s["mlflow"]["run_id"], "loss")
    assert [(h.step, h.value) for h in history] == [(m["step"], pytest.approx(m["loss"])) for m in metrics(out) if "loss" in m]
    mrun = client.get_run(s["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.params["adapter.r"] == "4"


def test_two_processes_over_gloo_match_one_process_stop_on_sigterm_and_resume(make_recipe, tmp_path):
    """`--num-processes 2` (accelerate; gloo on CPU) with half the batch each is the same global
    batch: the same losses and adapter as one process. SIGTERM stops both after the same step with
    a checkpoint, exit 143, and the run resumes on two processes."""
    train = {"scheduler": "constant", "log_every": 1, "save_every": None, "eval_every": 1000}
    two = tmp_path / "two"
    recipe = make_recipe(out=str(two), train={**train, "max_steps": 100000, "batch_size": 2})
    cmd = [sys.executable, "-m", "peftctl", "train", str(recipe), "--num-processes", "2"]
    proc = subprocess.Popen(cmd, env={**gloo_env(), "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (two / "metrics.jsonl").exists() and len(metrics(two)) >= 2, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.count("step 1/100000 ") == 1  # only the main process logs
    stopped = summary(two)
    n = stopped["steps"]
    assert stopped["status"] == "interrupted" and stopped["num_processes"] == 2
    assert stopped["epochs"] == pytest.approx(n * 2 * 2 / 48)  # n steps of 2 examples on each of 2 processes
    assert stopped["last_checkpoint"] == f"checkpoints/step-{n:06d}"

    p = subprocess.run([*cmd, "--resume", "auto", "--set", f"train.max_steps={n + 2}", "--json"],
                       env={**gloo_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)  # one JSON object, from the main process
    assert s["status"] == "completed" and s["steps"] == n + 2 and s["resumed_from"].endswith(f"step-{n:06d}")
    assert [m["step"] for m in metrics(two) if "loss" in m] == list(range(1, n + 3))  # each written once

    one = tmp_path / "one"
    run_json("train", make_recipe(out=str(one), train={**train, "max_steps": n + 2, "batch_size": 4}))
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    a, b = adapter(one), adapter(two)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert json.loads((one / "adapter_config.json").read_text()) == json.loads((two / "adapter_config.json").read_text())


def test_more_processes_than_gpus_is_refused_before_launching(make_recipe, tmp_path):
    """On a GPU machine each process takes a GPU: more than there are is exit 2, nothing launched
    (NCCL otherwise fails in every process with 'invalid usage')."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the GPU machine): without one the processes share the host (gloo)")
    n = torch.cuda.device_count() + 1
    r = run("train", make_recipe(out=str(tmp_path / "run")), "--num-processes", str(n), code=2)
    assert f"--num-processes {n}: each process takes one GPU" in r.stderr
    assert not (tmp_path / "run").exists()


def _fsdp2_worker(rank: int, world: int, model_dir: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from peftctl import LoraConfig, get_peft_model
    from peftctl.train import checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def build():
            torch.manual_seed(0)
            return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                  LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

        def adam(model):
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

        def step(model, opt, seed):
            torch.manual_seed(seed)
            ids = torch.randint(0, 300, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

        plain, sharded = build(), build()
        mesh = init_device_mesh("cpu", (world,))
        for layer in sharded.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        plain_opt, sharded_opt = adam(plain), adam(sharded)
        step(plain, plain_opt, 1)
        step(sharded, sharded_opt, 1)
        # The optimizer state round trip a checkpoint makes, into a fresh optimizer.
        state = checkpoint.optimizer_state(sharded, sharded_opt, fsdp=True)
        sharded_opt = adam(sharded)
        checkpoint.load_optimizer_state(sharded, sharded_opt, state, fsdp=True)
        step(plain, plain_opt, 2)
        step(sharded, sharded_opt, 2)
        gathered = checkpoint.adapter_state(sharded)  # every process takes part
        expected = checkpoint.adapter_state(plain)
        assert gathered.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(gathered[k], expected[k], atol=1e-6, rtol=1e-5)
        if rank == 0:
            # The one saving path: the gathered tensors written as save_pretrained writes the live ones.
            import tempfile

            from safetensors.torch import load_file

            with tempfile.TemporaryDirectory() as tmp:
                sharded.save_adapter("default", Path(tmp) / "gathered", tensors=gathered)
                plain.save_pretrained(Path(tmp) / "plain")
                configs = [json.loads((Path(tmp) / d / "adapter_config.json").read_text()) for d in ("gathered", "plain")]
                assert configs[0] == configs[1]
                written, live = (load_file(Path(tmp) / d / "adapter_model.safetensors") for d in ("gathered", "plain"))
                assert written.keys() == live.keys() == expected.keys()
                for k in live:
                    torch.testing.assert_close(written[k], live[k], atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_fsdp2_checkpoint_state_gathers_and_round_trips(tiny_model_dir):
    """The FSDP2 paths of checkpoints (adapter gathered from DTensor shards, optimizer state as a
    full state dict and back) on two CPU processes over gloo. (accelerate's FSDP launch itself
    needs GPUs: bench/ddp_check.py runs it.)"""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp2_worker, args=(2, str(tiny_model_dir), port), nprocs=2)


def test_report_chart_places_points_by_value():
    """The terminal chart scales steps to columns and values to rows, labelled max, middle, min."""
    from peftctl.train.report import chart

    text = chart({"loss": ("*", [(1, 2.0), (2, 4.0), (3, 3.0)])}, width=3, height=3)
    assert text.splitlines() == [
        "4 | * ",
        "3 |  *",
        "2 |*  ",
        "  +---",
        "   step 1 3",
        "   * loss",
    ]
    flat = chart({"loss": ("*", [(5, 1.0), (6, 1.0)])}, width=2, height=3).splitlines()
    assert flat[:3] == ["1.5 |  ", "  1 |**", "0.5 |  "]  # one value: centred, ±0.5 around it
    single = chart({"loss": ("*", [(7, 2.0)])}, width=3, height=3).splitlines()
    assert single[1] == "  2 |*  " and single[4] == "     step 7 7"  # one step: the first column
