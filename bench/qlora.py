"""QLoRA on one GPU, peftctl against Hugging Face PEFT in the same run, and peftctl's peak-memory
estimate (`peftctl inspect RECIPE --memory`) against the measured peaks.

Setup (ENVIRONMENT.md's reference): a Llama-3.1-8B-shaped model with random weights, LoRA r=16,
alpha 32, dropout 0 on q,k,v,o,gate,up,down, batch 4 x 2048, gradient checkpointing, fused AdamW,
SDPA attention; tokens/s over 8 steps after 3 warm-up steps; peak = torch.cuda.max_memory_allocated
over the timed steps.

- qlora-gc: 4-bit nf4 with double quantization, bfloat16 compute.
  PEFT: from_pretrained(quantization_config=BitsAndBytesConfig(...)), prepare_model_for_kbit_training
  (its defaults: gradient checkpointing), get_peft_model, model.train(); loss = model(**batch).loss.
  peftctl: its product path: a recipe with `model.quantization: {bits: 4}`; models.load_model,
  adapters.attach, train.enable_gradient_checkpointing, model.train(), train.optim.build_optimizer,
  and the train loop's loss (loss.loss_sum).
- bf16-gc: the same in bfloat16 without quantization (PEFT with non-reentrant checkpointing and
  enable_input_require_grads, as bench/train_throughput.py).

Random weights need a checkpoint to quantize from: one is written once under --workdir (16 GB for
the 8B shape, bfloat16 safetensors) by a subprocess, then each (setup, implementation) runs in its
own subprocess so that peaks do not mix. peftctl's estimate is computed in its subprocess from the
same recipe before the model loads (on the meta device), and compared with the measured peak.

    python bench/qlora.py --workdir /tmp/qlora --out qlora.json          # on the GPU machine
    python bench/qlora.py --model tiny --device cpu --workdir /tmp/q     # a smoke test on CPU

Prints one final table (tokens/s, peak GiB, ratios to PEFT, estimate, estimate/measured) and writes
it as JSON (--out). On CPU the "peak" is the process's peak RSS, not comparable with the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES, TARGETS  # noqa: E402

REFERENCE = {"qlora-gc": "ENVIRONMENT.md, PEFT alone: 2,911 tokens/s, 27.8 GiB",
             "bf16-gc": "ENVIRONMENT.md, PEFT alone: 6,945 tokens/s, 31.4 GiB (6,528 in a later run)"}
DEFAULT_RUNS = "qlora-gc:peft,qlora-gc:peftctl,bf16-gc:peftctl,bf16-gc:peft"


def checkpoint_dir(args) -> Path:
    return Path(args.workdir) / f"{args.model}-random-bf16"


def make_checkpoint(args) -> dict:
    """Random bfloat16 weights saved as a transformers folder (once; a marker says it is complete)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = checkpoint_dir(args)
    if (folder / "done").exists():
        return {"checkpoint": str(folder), "seconds": 0.0, "reused": True}
    start = time.perf_counter()
    config = LlamaConfig(**SHAPES[args.model], max_position_embeddings=max(args.seq, 2048))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    (folder / "done").write_text("complete\n")
    return {"checkpoint": str(folder), "seconds": time.perf_counter() - start, "reused": False}


def recipe_for(args, setup: str):
    """The recipe a peftctl user would write for this setup (its data and output are not used)."""
    from peftctl import recipe as recipe_lib

    model = {"name_or_path": str(checkpoint_dir(args)), "dtype": "bfloat16", "attn_implementation": "sdpa"}
    if setup.startswith("qlora"):
        model["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    return recipe_lib.from_dict({
        "model": model,
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": "unused.jsonl", "max_length": args.seq},
        "train": {"batch_size": args.batch, "gradient_checkpointing": True, "optimizer": "adamw", "lr": 1e-4},
        "output": {"dir": str(Path(args.workdir) / "unused-run")},
    }, base_dir=args.workdir)


def peak_bytes(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_peft(args, setup: str):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if args.device == "cuda":
        kw["device_map"] = {"": 0}
    if setup.startswith("qlora"):
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(args), **kw)
        model = peft.prepare_model_for_kbit_training(model)  # its defaults: gradient checkpointing on
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(args), **kw)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda")

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, None


def load_peftctl(args, setup: str):
    from peftctl import models
    from peftctl.adapters import attach
    from peftctl.inspect import inspect_recipe
    from peftctl.loss import loss_sum
    from peftctl.memory import Workload
    from peftctl.train import enable_gradient_checkpointing
    from peftctl.train.optim import build_optimizer

    recipe = recipe_for(args, setup)
    # `peftctl inspect RECIPE --memory`, before anything is loaded
    estimate = inspect_recipe(recipe, Workload(args.batch, args.seq))["memory"]
    # On a GPU the weights load straight onto it (a quantized base always does: bitsandbytes
    # quantizes them as they arrive); `peftctl train` loads an unquantized one, then moves it.
    device_map = {"": 0} if args.device == "cuda" else None
    model = attach(models.load_model(recipe.model, device_map=device_map), recipe.adapter)
    if recipe.uses_gradient_checkpointing():
        enable_gradient_checkpointing(model)
    model.train()
    opt = build_optimizer(model, recipe.train)

    def step(batch):
        loss, n = loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss / n

    return step, estimate


def run_one(args) -> dict:
    import torch

    start = time.perf_counter()
    step, estimate = (load_peft if args.impl == "peft" else load_peftctl)(args, args.setup)
    load_s = time.perf_counter() - start
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPES[args.model]["vocab_size"], (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(args.warmup):
        step(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    row = {
        "impl": args.impl, "setup": args.setup, "model": args.model, "batch": args.batch, "seq": args.seq,
        "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
        "peak_gib": peak_bytes(args.device) / 2**30, "loss": float(loss), "load_s": load_s,
    }
    if estimate is not None:
        row["estimate_gib"] = estimate["total"] / 2**30
        row["estimate_parts_gib"] = {k: estimate[k] / 2**30 for k in (
            "base_weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")}
    return row


def child(args, *extra: str, timeout: float) -> tuple[dict | None, str]:
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--workdir", args.workdir, *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr.strip().splitlines() or ["?"])[-3:]
        return None, " | ".join(tail)
    return json.loads(line[len("RESULT "):]), ""


def table(rows: list[dict], args, header: str) -> str:
    out = [header, f"{'setup':9}{'impl':9}{'tokens/s':>10}{'peak GiB':>10}{'speed x':>9}{'memory x':>10}"
                   f"{'estimate':>10}{'est/meas':>10}{'load s':>8}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['setup']:9}{r['impl']:9}  {r['error'][:110]}")
            continue
        ref = next((x for x in rows if x["setup"] == r["setup"] and x["impl"] == "peft" and "error" not in x), None)
        sx = f"{r['tokens_per_s'] / ref['tokens_per_s']:9.2f}" if ref else f"{'-':>9}"
        mx = f"{r['peak_gib'] / ref['peak_gib']:10.2f}" if ref else f"{'-':>10}"
        est = f"{r['estimate_gib']:10.1f}{r['estimate_gib'] / r['peak_gib']:10.2f}" if "estimate_gib" in r else f"{'-':>10}{'-':>10}"
        out.append(f"{r['setup']:9}{r['impl']:9}{r['tokens_per_s']:10.0f}{r['peak_gib']:10.1f}{sx}{mx}{est}{r['load_s']:8.0f}")
    for setup in dict.fromkeys(r["setup"] for r in rows):
        out.append(f"reference {setup}: {REFERENCE.get(setup, '-')}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of setup:impl (default {DEFAULT_RUNS})")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--workdir", default="/tmp/peftctl-qlora-bench", help="where the random checkpoint is written")
    ap.add_argument("--child-timeout", type=float, default=240.0, help="seconds one measurement (or writing the checkpoint) may take")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for the whole script: runs that would start too late are skipped, so the table "
                         "is printed within one 10-minute device call")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/qlora.py needs a CUDA GPU (or --device cpu for a smoke test); none here", file=sys.stderr)
        return 2
    if args.make_checkpoint:
        print("RESULT " + json.dumps(make_checkpoint(args)), flush=True)
        return 0
    if args.impl:  # a child: one measurement, one JSON line
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    started = time.perf_counter()
    deadline = started + args.budget
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    made, err = child(args, "--make-checkpoint", timeout=min(args.child_timeout, args.budget))
    if made is None:
        print(f"writing the random checkpoint failed: {err}", file=sys.stderr)
        return 1
    how = "reused" if made["reused"] else f"written in {made['seconds']:.0f} s"
    print(f"checkpoint {made['checkpoint']}: {how}", file=sys.stderr)
    rows = []
    for item in args.runs.split(","):
        setup, impl = item.split(":")
        left = deadline - time.perf_counter()
        if left < 60:
            rows.append({"setup": setup, "impl": impl, "error": f"skipped: {left:.0f} s of the --budget left"})
            continue
        row, err = child(args, "--setup", setup, "--impl", impl, timeout=min(args.child_timeout, left))
        rows.append(row if row is not None else {"setup": setup, "impl": impl, "error": f"failed: {err}"})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (peak = RSS)"
    header = (f"\n{args.model}, batch {args.batch} x {args.seq}, LoRA r=16 on {','.join(TARGETS)}, gradient "
              f"checkpointing, {device}, torch {torch.__version__}, wall {time.perf_counter() - started:.0f} s")
    print(table(rows, args, header))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": made, "rows": rows}, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
