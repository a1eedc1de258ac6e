"""LoRA training throughput and peak memory: peftctl against Hugging Face PEFT, side by side.

Each (setup, implementation) pair runs in its own subprocess on the same GPU, one after the
other, so peak-memory figures do not mix. Weights are random (speed does not depend on their
values); every setting but the implementation is the same for both: model shape, batch, sequence
length, LoRA r=16 / alpha 32 / dropout 0 on q,k,v,o,gate,up,down, fused AdamW, SDPA attention.

    python bench/train_throughput.py --model llama-1b --setups bf16 --batch 8
    python bench/train_throughput.py --model llama-8b --setups bf16,bf16-gc --batch 4

Prints one table with tokens/s, peak GiB and the peftctl/PEFT ratios, and writes the rows as JSON
(--out). Needs a CUDA GPU; on a machine without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    # Llama-3.2-1B and Llama-3.1-8B shapes (128k vocabulary).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model


def run_one(args) -> dict:
    import torch

    model = build_model(args.model, args.seq)
    gc = args.setup.endswith("-gc")
    if args.impl == "peft":
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    else:
        import peftctl

        cfg = peftctl.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = peftctl.get_peft_model(model, cfg)
    if gc:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_model.model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPES[args.model]["vocab_size"], (args.batch, args.seq), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    if args.impl == "peft":
        def step():
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        from peftctl.loss import loss_sum

        def step():
            loss, n = loss_sum(model, batch)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "impl": args.impl, "setup": args.setup, "model": args.model, "batch": args.batch, "seq": args.seq,
        "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--setups", default="bf16", help="comma list of: bf16, bf16-gc")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impls", default="peft,peftctl")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench/train_throughput.py needs a CUDA GPU; none here", file=sys.stderr)
        return 2
    if args.impl:  # the child: one measurement, one JSON line
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    rows = []
    for setup in args.setups.split(","):
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--impl", impl, "--setup", setup, "--model", args.model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                err = (p.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"impl": impl, "setup": setup, "error": err})
                print(f"{setup} {impl}: failed: {err}", file=sys.stderr)
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, batch {args.batch} x {args.seq}, LoRA r=16 on {','.join(TARGETS)}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'setup':10}{'impl':9}{'tokens/s':>10}{'peak GiB':>10}{'speed x':>9}{'memory x':>9}")
    for setup in args.setups.split(","):
        ref = next((r for r in rows if r["setup"] == setup and r["impl"] == "peft" and "error" not in r), None)
        for r in (r for r in rows if r["setup"] == setup):
            if "error" in r:
                print(f"{setup:10}{r['impl']:9}  failed: {r['error'][:60]}")
                continue
            sx = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
            mx = r["peak_gib"] / ref["peak_gib"] if ref else float("nan")
            print(f"{setup:10}{r['impl']:9}{r['tokens_per_s']:10.0f}{r['peak_gib']:10.1f}{sx:9.2f}{mx:9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
