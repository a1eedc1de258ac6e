"""LoRA and QLoRA training speed and memory: peftctl against Hugging Face PEFT, PEFT + Liger-Kernel and
Unsloth on the same shapes in one invocation, plus `peftctl train` end to end and the memory-budget curve.

Every tool runs in its own subprocess (one per tool and shape; it measures each setup in turn,
freeing the model in between), so peaks do not mix and Unsloth, which patches transformers when it
is imported, patches only its own process. Each measures the same step on the same random batch:
LoRA r=16, alpha 32, dropout 0 on q,k,v,o,gate,up,down; fused AdamW; SDPA attention; random weights
(speed does not depend on their values); tokens/s over --steps steps after --warmup; peak =
torch.cuda.max_memory_allocated over the timed steps.

Setups: bf16; bf16-gc (gradient checkpointing); qlora-gc (4-bit nf4, double quantization, bf16
compute, checkpointing); for peftctl also bf16-offload and qlora-offload (every layer checkpointed,
its input in pinned host memory: what `train.memory_budget` picks when nothing else fits) and
budget-G (`train.memory_budget: G` GiB, the plan it picks). How each tool is set up:

- peft: `peft.get_peft_model`; checkpointing with use_reentrant=False and enable_input_require_grads;
  QLoRA via BitsAndBytesConfig and `prepare_model_for_kbit_training`; loss = model(**batch).loss.
- peft-liger: the same after `liger_kernel.transformers.apply_liger_kernel_to_llama()` (RoPE,
  RMSNorm, SwiGLU, fused linear cross-entropy).
- unsloth: `FastLanguageModel.from_pretrained(folder, local_files_only=True)` and `get_peft_model`
  with use_gradient_checkpointing "unsloth" (its offloading mode) or False; loss = model(**batch).loss.
- peftctl: what `peftctl train` does (`train.speed_settings`: fused kernels, checkpointing or the
  budget's plan; `train.optim.build_optimizer`; the loop's `loss.prepare` and `loss_sum`);
  peftctl-plain: the same with train.kernels false.

    python bench/speed.py --shape llama-1b --batch 8 --setups bf16,bf16-gc,qlora-gc \\
        --impls peftctl,peft,peft-liger,unsloth --out bench/results/X.json
    python bench/speed.py --shape llama-8b --batch 4 --setups bf16,budget-18,budget-24 --impls peftctl
    python bench/speed.py --train packed,unpacked --shape llama-1b --batch 8   # `peftctl train` end to end
    python bench/speed.py --quick ...   # 2 warm-up and 4 timed steps

Random weights are written once as a checkpoint folder with a word-level tokenizer of the model's
vocabulary (Unsloth and the quantized loads read a folder). The table gives tokens/s, peak GiB,
peftctl's speed and memory ratios to each peer, and MFU (model FLOPs: 4 N per token for the frozen
linears' forward and input gradients, N the linear weights including the head, plus causal
attention 6 s h per token and layer; checkpointing adds 2 N + 2 s h of recomputed forward) against
the bf16 matrix rate measured at the start. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SHAPES, TARGETS  # noqa: E402

PEERS = ("peft", "peft-liger", "unsloth")


# ---- model, data, checkpoint ------------------------------------------------------------------------
def config_of(shape: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048), bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def folder_of(args) -> Path:
    return Path(args.workdir) / f"{args.shape}-random"


def make_folder(args) -> float:
    """A random-weight bf16 checkpoint with a word-level tokenizer of the vocabulary size (once)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = folder_of(args)
    if (folder / "done").exists():
        return 0.0
    start = time.perf_counter()
    config = config_of(args.shape, args.seq)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=args.seq)
    fast.save_pretrained(folder)
    (folder / "done").write_text("complete\n")
    return time.perf_counter() - start


def in_process_model(args):
    import torch
    from transformers import LlamaForCausalLM

    config = config_of(args.shape, args.seq)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (an 8B model in float32 first would take 32 GB)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def batch_of(args):
    import torch

    torch.manual_seed(1)
    ids = torch.randint(4, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ---- one tool, one setup ----------------------------------------------------------------------------------
def setup_peft(args, setup: str, liger: bool):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    if setup.startswith("qlora"):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder_of(args), dtype=torch.bfloat16, quantization_config=q,
                                                     device_map={"": args.device}, attn_implementation="sdpa")
        model = peft.prepare_model_for_kbit_training(model)  # its defaults: checkpointing on
    else:
        model = in_process_model(args)
        if setup.endswith("-gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=args.device == "cuda")
    batch = {k: v.to(args.device) for k, v in batch_of(args).items()}

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step, {}


def setup_unsloth(args, setup: str):
    import torch
    from unsloth import FastLanguageModel

    gc_mode = "unsloth" if setup.endswith("-gc") else False
    model, _ = FastLanguageModel.from_pretrained(str(folder_of(args)), max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=setup.startswith("qlora"), local_files_only=True,
                                                 use_gradient_checkpointing=gc_mode)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing=gc_mode)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    batch = {k: v.cuda() for k, v in batch_of(args).items()}

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step, {}


def setup_peftctl(args, setup: str, kernels: bool):
    import torch

    from peftctl import recipe as recipe_lib
    from peftctl.loss import loss_sum, prepare
    from peftctl.train import prepare_model, speed_settings
    from peftctl.train.optim import build_optimizer
    from peftctl.ui import Reporter

    quantized = setup.startswith("qlora")
    budget = float(setup.split("-", 1)[1]) if setup.startswith("budget-") else None
    if setup.endswith("-offload"):
        budget = 0.001  # nothing fits: every layer checkpointed, inputs in host memory
    train = {"batch_size": args.batch, "optimizer": "adamw", "lr": 1e-4, "kernels": kernels}
    if budget is not None:
        train["memory_budget"] = budget
    else:
        train["gradient_checkpointing"] = setup.endswith("-gc")
    model_section = {"name_or_path": str(folder_of(args)), "dtype": "bfloat16", "attn_implementation": "sdpa"}
    if quantized:
        model_section["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                         "compute_dtype": "bfloat16"}
    recipe = recipe_lib.from_dict({
        "model": model_section,
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": "unused.jsonl", "max_length": args.seq},
        "train": train,
        "output": {"dir": str(Path(args.workdir) / "unused-run")},
    }, base_dir=args.workdir)
    if quantized or args.from_folder:
        model, _ = prepare_model(recipe, dtype=torch.bfloat16, device_map={"": args.device})
    else:  # the same adapter on the in-process random model (no folder to write for bf16 rows)
        from peftctl.adapters import attach

        model = attach(in_process_model(args), recipe.adapter)
    host = batch_of(args)
    examples = [SimpleNamespace(input_ids=row.tolist(), num_loss_tokens=args.seq - 1) for row in host["input_ids"]]
    device = torch.device(args.device)
    chosen = speed_settings(model, recipe.train, examples, device, Reporter())
    from peftctl import memory
    from peftctl.train import budget as budget_lib

    plan = chosen["memory_plan"]
    est = memory.estimate(model, model.get_base_model().config, workload=budget_lib.workload(examples, args.batch),
                          gradient_checkpointing=bool(recipe.train.gradient_checkpointing), optimizer="adamw",
                          fused=budget_lib.kernels_on(recipe.train.kernels, device),
                          checkpoint_layers=None if plan is None else plan["checkpoint_layers"],
                          offload=plan is not None and plan["offload"])
    model.train()
    opt = build_optimizer(model, recipe.train)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(phase=None):
        batch, lp = prepare(host, device, pin=device.type == "cuda")
        loss, n = loss_sum(model, batch, lp)
        if phase:
            phase("forward")
        (loss / n).backward()
        if phase:
            phase("backward")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phase:
            phase("optimizer")
        return loss / n

    return model, step, {"kernels": chosen["kernels"], "memory_plan": plan, "estimate_gib": est["total"] / 2**30}


def measure(args, impl: str, setup: str, profile: bool = False) -> dict:
    import torch

    cuda = args.device == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else 0  # left over from earlier setups: 0 (see release)
    start = time.perf_counter()
    if impl in ("peft", "peft-liger"):
        model, step, extra = setup_peft(args, setup, liger=impl == "peft-liger")
    elif impl == "unsloth":
        model, step, extra = setup_unsloth(args, setup)
    else:
        model, step, extra = setup_peftctl(args, setup, kernels="auto" if impl == "peftctl" else False)
    load_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    row = {"impl": impl, "setup": setup, "shape": args.shape, "batch": args.batch, "seq": args.seq,
           "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
           "peak_gib": peak / 2**30, "loss": float(loss), "load_s": load_s,
           "baseline_gib": baseline / 2**30, **extra}
    del loss
    if cuda and impl.startswith("peftctl"):
        row["phases_gib"] = phases(step)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        Path(args.workdir, f"profile-{impl}-{setup}.txt").write_text(table)
        print(table, file=sys.stderr)
    del model, step
    release(args.device)
    return row


def release(device: str) -> None:
    """Free what a setup left. On a GPU the last setup's autograd graph stayed alive after the
    setup was freed, until the device's next backward (measured on an H200: the next setup began
    with the last one's decoder weights, LoRA weights and one activation-sized tensor allocated,
    what the custom autograd functions' contexts and the graph's leaves reference: 13.2 GiB after
    a bf16 8B setup); one tiny backward on the device frees it (0.06 GiB left). Without it a
    setup's peak counted the setup before it (the 3.2 GiB "estimate error" of budget 24 on
    2026-11-29 was QLoRA's 3.57 GiB left over)."""
    import torch

    if device == "cuda":
        torch.ones(1, device=device, requires_grad=True).sum().backward()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def phases(step) -> dict:
    """One more step, the peak (GiB) of each phase (forward with the loss, backward, optimizer) and
    what stays allocated after it: where the step's peak is."""
    import torch

    torch.cuda.synchronize()
    out = {"before": torch.cuda.memory_allocated() / 2**30}
    torch.cuda.reset_peak_memory_stats()

    def phase(name):
        out[name] = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()

    step(phase)
    torch.cuda.synchronize()
    return out


def child(args) -> int:
    if args.impl == "unsloth":
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        os.environ["HF_HUB_OFFLINE"] = "1"
        import unsloth  # noqa: F401  (first: it patches transformers for this process)
    for setup in args.setups.split(","):
        try:
            row = measure(args, args.impl, setup, profile=args.profile)
        except Exception as e:  # one setup's failure is a row, not the end of the tool's run
            import traceback

            traceback.print_exc()
            row = {"impl": args.impl, "setup": setup, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if "error" in row:
            release(args.device)  # here, once the exception (whose frames hold the model) is gone
        print("RESULT " + json.dumps(row), flush=True)
    return 0


# ---- `peftctl train` end to end ----------------------------------------------------------------------
def train_e2e(args, kind: str, timeout: float) -> dict:
    """`peftctl train` on text rows: unpacked rows that fill the sequence, or packed rows of 100 to
    1,500 words. tokens/s: the median of the logged per-step rates after the warm-up steps."""
    import random

    import yaml

    work = Path(args.workdir) / f"train-{kind}"
    work.mkdir(parents=True, exist_ok=True)
    kind, _, procs = kind.partition("-np")  # unpacked-np2: the same on two processes (DDP)
    procs = int(procs or 1)
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    steps = args.warmup + args.steps + 2
    rows = []
    need = procs * args.batch * steps * (3 if kind == "packed" else 1) + 64
    for _ in range(need):
        n = args.seq + 8 if kind == "unpacked" else rng.randint(100, 1500)
        rows.append({"text": " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))})
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name_or_path": str(folder_of(args)), "dtype": "bfloat16", "attn_implementation": "sdpa"},
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS},
        "data": {"train": str(data), "format": "text", "max_length": args.seq, "packing": kind == "packed",
                 "cache": False},
        "train": {"max_steps": steps, "batch_size": args.batch, "lr": 1e-4, "log_every": 1, "save_every": None,
                  "gradient_checkpointing": args.shape == "llama-8b"},
        "output": {"dir": str(work / "run")},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    subprocess.run(["rm", "-rf", str(work / "run")], check=False)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "peftctl", "train", str(path), "--json"]
    if procs > 1:
        cmd += ["--num-processes", str(procs)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        return {"impl": "peftctl train", "setup": work.name.removeprefix("train-"),
                "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    summary = json.loads(p.stdout)
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m and m["step"] > args.warmup + 1]
    return {"impl": "peftctl train", "setup": work.name.removeprefix("train-"), "processes": procs,
            "shape": args.shape, "batch": args.batch, "seq": args.seq,
            "tokens_per_s": statistics.median(rates), "peak_gib": summary["peak_memory_bytes"] / 2**30,
            "steps": summary["steps"], "wall_s": wall, "data": summary.get("data"), "kernels": summary.get("kernels")}


# ---- the parent ------------------------------------------------------------------------------------------
def matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def flops_per_token(shape: str, seq: int, checkpointing: bool) -> float:
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    linear = layers * (h * (2 * h + 2 * kv) + 3 * h * i)
    attention = 6 * seq * h * layers  # causal: forward 2 s h, backward 4 s h per token and layer
    total = 4 * (linear + h * v) + attention
    if checkpointing:
        total += 2 * linear + 2 * seq * h * layers
    return total


def run_child(args, impl: str, setups: str, timeout: float) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, "--setups", setups, "--shape", args.shape,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--workdir", args.workdir, "--device", args.device]
    cmd += ["--profile"] if args.profile and impl == "peftctl" else []
    cmd += ["--from-folder"] if args.from_folder else []
    env = dict(os.environ)
    cwd = Path(args.workdir) / f"cwd-{impl}"  # Unsloth writes a compile cache into its working folder
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
        out, err, code = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, code = f"timed out after {timeout:.0f} s", -1
    Path(args.workdir, f"log-{impl}-{args.shape}.txt").write_text(out + "\n---- stderr\n" + (err or ""))
    rows = [json.loads(x[len("RESULT "):]) for x in out.splitlines() if x.startswith("RESULT ")]
    done = {r["setup"] for r in rows}
    tail = " | ".join((err or "?").strip().splitlines()[-2:])[:300]
    for setup in setups.split(","):
        if setup not in done:
            rows.append({"impl": impl, "setup": setup, "error": f"exit {code}: {tail}"})
    return rows


def table(rows: list[dict], args, peak: float) -> str:
    out = [f"{'setup':15}{'impl':14}{'tok/s':>9}{'GiB':>7}{'MFU':>6}  " + "".join(
        f"{'vs ' + p:>17}" for p in PEERS)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['setup']:15}{r['impl']:14}  {r['error'][:120]}")
            continue
        gc_ = r["setup"].endswith(("-gc", "-offload")) or r["setup"].startswith("budget") and bool(
            (r.get("memory_plan") or {}).get("checkpoint_layers"))
        mfu = flops_per_token(r["shape"], r["seq"], gc_) * r["tokens_per_s"] / (peak * 1e12)
        ratios = ""
        if r["impl"].startswith("peftctl"):
            for p in PEERS:
                base = r["setup"].replace("-offload", "-gc") if r["setup"].endswith("-offload") else r["setup"]
                ref = next((x for x in rows if x["impl"] == p and x["setup"] == base and "error" not in x), None)
                mem = r["peak_gib"] / ref["peak_gib"] if ref and ref["peak_gib"] else float("nan")
                ratios += f"{r['tokens_per_s'] / ref['tokens_per_s']:8.2f}x {mem:6.2f}x" if ref else f"{'-':>17}"
        est = f"  (estimate {r['estimate_gib']:.1f} GiB)" if "estimate_gib" in r else ""
        out.append(f"{r['setup']:15}{r['impl']:14}{r['tokens_per_s']:9.0f}{r['peak_gib']:7.1f}{mfu:6.2f}  {ratios}{est}")
    out.append("ratios: peftctl tokens/s and peak memory over the peer's, same setup (offload rows against -gc)")
    # The memory-budget curve against the straight line through Unsloth's checkpointed and
    # unchecked points (speed against peak memory), where both were measured.
    ends = [next((x for x in rows if x["impl"] == "unsloth" and x["setup"] == s and "error" not in x), None)
            for s in ("bf16-gc", "bf16")]
    if all(ends):
        (m1, y1), (m2, y2) = ((e["peak_gib"], e["tokens_per_s"]) for e in ends)
        out.append(f"Unsloth's line: ({m1:.1f} GiB, {y1:.0f}) to ({m2:.1f} GiB, {y2:.0f}); peftctl's bf16 points on it:")
        for r in rows:
            if r["impl"] == "peftctl" and "error" not in r and r["setup"].startswith(("bf16", "budget")):
                line = y1 + (y2 - y1) * (r["peak_gib"] - m1) / (m2 - m1)
                out.append(f"  {r['setup']:15}{r['peak_gib']:6.1f} GiB {r['tokens_per_s']:9.0f} tok/s; line there "
                           f"{line:9.0f}: {r['tokens_per_s'] / line:.3f}x")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--setups", default="bf16")
    ap.add_argument("--peftctl-setups", default="", help="peftctl's setups when they differ from --setups")
    ap.add_argument("--impls", default="peftctl,peft,peft-liger,unsloth",
                    help="comma list of peftctl, peftctl-plain, peft, peft-liger, unsloth")
    ap.add_argument("--train", default="", help="also `peftctl train` end to end: packed, unpacked; -npN: on N GPUs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 warm-up and 4 timed steps")
    ap.add_argument("--profile", action="store_true", help="print a profile of peftctl's step (2 steps)")
    ap.add_argument("--from-folder", action="store_true", help="peftctl bf16 rows load the checkpoint folder")
    ap.add_argument("--workdir", default="/tmp/peftctl-speed")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke test of the bench itself (peftctl and peft, --shape tiny)")
    ap.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole invocation")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 4, 2

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/speed.py needs a CUDA GPU (--device cpu: a smoke test); none here", file=sys.stderr)
        return 2
    args.workdir = str(Path(args.workdir).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.impl:
        return child(args)

    started = time.perf_counter()
    peak = matmul_tflops() if args.device == "cuda" else 1.0
    needs_folder = ("unsloth" in args.impls or "qlora" in args.setups or args.train or args.from_folder)
    folder_s = make_folder(args) if needs_folder else 0.0
    versions = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    for name in ("transformers", "peft", "liger_kernel", "unsloth", "triton", "bitsandbytes"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:
            versions[name] = None
    print(f"bf16 matmul {peak:.0f} TFLOP/s; checkpoint folder {folder_s:.0f} s; {versions}", flush=True)
    rows: list[dict] = []
    for impl in filter(None, args.impls.split(",")):
        setups = (args.peftctl_setups or args.setups) if impl.startswith("peftctl") else ",".join(
            s for s in args.setups.split(",") if s in ("bf16", "bf16-gc", "qlora-gc"))
        if impl == "peft-liger":
            setups = ",".join(s for s in setups.split(",") if not s.startswith("qlora"))
        if not setups:
            continue
        left = args.deadline - (time.perf_counter() - started)
        if left < 45:
            rows += [{"impl": impl, "setup": s, "error": "skipped: deadline"} for s in setups.split(",")]
            continue
        rows += run_child(args, impl, setups, left - 15)
        for r in rows[-len(setups.split(",")):]:
            print(json.dumps(r), flush=True)
    for kind in filter(None, args.train.split(",")):
        left = args.deadline - (time.perf_counter() - started)
        if left < 60:
            rows.append({"impl": "peftctl train", "setup": kind, "error": "skipped: deadline"})
            continue
        try:
            rows.append(train_e2e(args, kind, left - 10))
        except Exception as e:
            rows.append({"impl": "peftctl train", "setup": kind, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.shape}, batch {args.batch} x {args.seq}, LoRA r=16 on {','.join(TARGETS)}, {versions['gpu']}, "
          f"torch {versions['torch']}, {args.steps} steps after {args.warmup}, wall "
          f"{time.perf_counter() - started:.0f} s")
    print(table(rows, args, peak))
    if args.out:
        Path(args.out).write_text(json.dumps({"versions": versions, "matmul_tflops": peak, "args": vars(args),
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
