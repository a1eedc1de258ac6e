"""Several GPUs against one: the same global batch must give the same loss curve and an adapter in
the same format. Needs a machine with at least two GPUs.

    python bench/ddp_check.py [--dtype float32|bfloat16] [--steps 40] [--work /tmp/ddp-check]

It builds a small Llama with random weights (speed and agreement do not depend on the values) and a
byte-level tokenizer in --work, then trains the same recipe five ways and compares each with the
first:

    one       python -m peftctl train R  (batch 8, one GPU)
    one-again the same again (the run-to-run noise of one GPU)
    ddp       accelerate launch --config_file configs/ddp.yaml --num_processes 2 -m peftctl train R  (batch 4 each)
    np2       python -m peftctl train R --num-processes 2  (batch 4 each)
    fsdp      accelerate launch --config_file configs/fsdp.yaml --num_processes 2 -m peftctl train R
    resumed   the ddp run stopped by SIGTERM half way, then `--resume auto` on two GPUs

It prints a table (largest relative loss difference over all steps, largest adapter weight
difference, tokens/s) and exits 1 when a run fails, a curve is off by more than the tolerance
(float32: 1e-3, bfloat16: 3e-2, relative), or an adapter's keys, shapes, dtypes or config differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build(work: Path, dtype: str, steps: int) -> Path:
    import torch
    from tiny import build_tokenizer, write_chat_data
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        tok = build_tokenizer(model_dir)
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=320, max_position_embeddings=1024,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    write_chat_data(work / "train.jsonl", 640, seed=1)
    write_chat_data(work / "eval.jsonl", 64, seed=2)
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": dtype},
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"), "format": "chat",
                 "max_length": 64},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "scheduler": "cosine", "warmup_steps": 2,
                  "log_every": 1, "eval_every": max(1, steps // 4), "save_every": max(1, steps // 4), "seed": 0},
        "eval": {"batch_size": 16},
        "output": {"dir": str(work / "runs" / "unset")},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def peftctl(*args) -> list[str]:
    return [sys.executable, "-m", "peftctl", *map(str, args)]


def accelerate(config: str, *args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / config),
            "--num_processes", "2", "-m", "peftctl", *map(str, args)]


def sets(out: Path, batch: int, **extra) -> list[str]:
    pairs = {"output.dir": out, "train.batch_size": batch, **extra}
    return [x for k, v in pairs.items() for x in ("--set", f"{k}={v}")]


def run(name: str, cmd: list[str], log: Path) -> float:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"{name} failed with exit code {code} (log: {log})")
    return time.time() - start


def stop_half_way(cmd: list[str], out: Path, step: int, log: Path) -> None:
    """Start a run and send SIGTERM once its metrics reach `step`; it must exit 143."""
    print(f"== resumed (part 1, SIGTERM at step {step}): {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None:
            if metrics.exists() and sum(1 for x in metrics.read_text().splitlines() if '"loss"' in x) >= step:
                os.killpg(proc.pid, signal.SIGTERM)  # as a batch system does: the whole process group
                break
            time.sleep(0.05)
        proc.wait()
    status = json.loads((out / "summary.json").read_text())["status"]
    print(f"   exit {proc.returncode}, status {status}")
    if status != "interrupted":
        raise SystemExit(f"the run was not interrupted (status {status}; log {log})")


def losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def compare(ref: Path, other: Path) -> dict:
    from safetensors.torch import load_file

    a, b = losses(ref), losses(other)
    if [s for s, _ in a] != [s for s, _ in b]:
        return {"error": f"logged steps differ: {[s for s, _ in a][:5]}... vs {[s for s, _ in b][:5]}..."}
    rel = max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b, strict=True))
    wa, wb = load_file(ref / "adapter_model.safetensors"), load_file(other / "adapter_model.safetensors")
    same_format = ({k: (v.shape, v.dtype) for k, v in wa.items()} == {k: (v.shape, v.dtype) for k, v in wb.items()}
                   and json.loads((ref / "adapter_config.json").read_text())
                   == json.loads((other / "adapter_config.json").read_text()))
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) if same_format else float("nan")
    summary = json.loads((other / "summary.json").read_text())
    return {"max_rel_loss_diff": rel, "max_adapter_diff": diff, "same_format": same_format,
            "final_loss": b[-1][1], "tokens_per_s": summary.get("tokens_per_s"),
            "num_processes": summary.get("num_processes"), "status": summary.get("status")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ddp-check"))
    ap.add_argument("--skip", nargs="*", default=[], help="runs to leave out (ddp, np2, fsdp, resumed, one-again)")
    ap.add_argument("--fsdp-repeats", type=int, default=1, help="run the FSDP2 training this many times")
    args = ap.parse_args()
    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs two GPUs, found {torch.cuda.device_count()}")
    work = args.work
    shutil.rmtree(work / "runs", ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    recipe = build(work, args.dtype, args.steps)
    runs = work / "runs"
    env_note = f"torch {torch.__version__}, {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    print(f"{env_note}; recipe {recipe}; dtype {args.dtype}; {args.steps} steps; global batch 8")

    times = {"one": run("one", peftctl("train", recipe, *sets(runs / "one", 8)), runs / "one.log")}
    plans = {
        "ddp": accelerate("ddp.yaml", "train", recipe, *sets(runs / "ddp", 4)),
        "np2": peftctl("train", recipe, "--num-processes", 2, *sets(runs / "np2", 4)),
        "fsdp": accelerate("fsdp.yaml", "train", recipe, *sets(runs / "fsdp", 4)),
    }
    # One GPU again: how far two runs of the same training differ (kernels whose reductions are not
    # deterministic; in bfloat16 a step's rounding differences grow through later steps): the noise
    # floor the other rows' differences are read against.
    plans["one-again"] = peftctl("train", recipe, *sets(runs / "one-again", 8))
    for k in range(2, args.fsdp_repeats + 1):
        plans[f"fsdp{k}"] = accelerate("fsdp.yaml", "train", recipe, *sets(runs / f"fsdp{k}", 4))
    for name, cmd in plans.items():
        if name not in args.skip and not (name.startswith("fsdp") and "fsdp" in args.skip):
            times[name] = run(name, cmd, runs / f"{name}.log")
    if "resumed" not in args.skip:
        cmd = accelerate("ddp.yaml", "train", recipe, *sets(runs / "resumed", 4))
        stop_half_way(cmd, runs / "resumed", args.steps // 2, runs / "resumed-1.log")
        times["resumed"] = run("resumed (part 2)", cmd + ["--resume", "auto"], runs / "resumed-2.log")

    tolerance = 1e-3 if args.dtype == "float32" else 3e-2
    failed = False
    print(f"\n{'run':<9} {'procs':>5} {'status':<10} {'max rel loss diff':>17} {'max |Δw|':>10} {'format':>7} "
          f"{'tokens/s':>9} {'wall s':>7}")
    for name in times:
        c = compare(runs / "one", runs / name)
        if "error" in c:
            print(f"{name:<9} {c['error']}")
            failed = True
            continue
        ok = c["max_rel_loss_diff"] <= tolerance and c["same_format"] and c["status"] == "completed"
        failed |= not ok
        print(f"{name:<9} {c['num_processes']:>5} {c['status']:<10} {c['max_rel_loss_diff']:>17.2e} "
              f"{c['max_adapter_diff']:>10.2e} {str(c['same_format']):>7} {c['tokens_per_s'] or 0:>9.0f} "
              f"{times[name]:>7.1f}{'' if ok else '   <-- FAIL'}")
    print(f"\ntolerance: relative loss difference <= {tolerance:g} at every step")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
