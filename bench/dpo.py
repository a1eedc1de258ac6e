"""DPO training speed and peak memory: peftctl against TRL's DPOTrainer + PEFT, in the same run.

Setup: a Llama-3.1-8B-shaped model with random bfloat16 weights (no checkpoint needed: the same
seed builds the same weights in each subprocess), LoRA r=16, alpha 32, dropout 0 on q,k,v,o,gate,
up,down, gradient checkpointing (non-reentrant), fused AdamW, SDPA attention; a batch of --pairs
pairs, each a --prompt-token prompt and two --answer-token answers (random ids); beta 0.1, the
reference = the same model with its adapters disabled, computed in every step (no precompute).

- peftctl: its product path: adapters.attach, the fused kernels on a GPU (train.kernels: auto;
  --no-kernels: the model's own modules), train.enable_gradient_checkpointing,
  train.optim.build_optimizer, and the training loop's pair step (preference.pair_batch,
  loss.prepare, preference.micro_step: one forward of chosen and rejected, log-probabilities
  from the chunked linear cross-entropy, no full logits; the reference forward under no_grad).
- trl: DPOTrainer(model, args=DPOConfig(bf16, gradient_checkpointing), peft_config=LoraConfig),
  then its loss on the same batch (trainer.compute_loss: its concatenated forward and its
  reference with adapters disabled), backward and the same fused AdamW; TRL's data pipeline is
  not timed (it is handed the tokenized batch).

tokens/s counts every real token of both sequences (2 x pairs x (prompt + answer)) per optimizer
step, over --steps steps after --warmup; peak = torch.cuda.max_memory_allocated over the timed
steps. Each implementation runs in its own subprocess so that peaks do not mix.

    python bench/dpo.py --out dpo.json          # on the GPU machine (needs trl, datasets, peft)
    python bench/dpo.py --tiny                  # a smoke test on CPU: tiny shape, short sequences
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


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[args.model], max_position_embeddings=max(args.prompt + args.answer, 2048),
                         attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def pairs_batch(args):
    """The same pairs for both: (2B, L) ids, attention mask, labels (-100 on the prompt)."""
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.model]["vocab_size"]
    prompt = torch.randint(1, vocab, (args.pairs, args.prompt), generator=g)
    answers = torch.randint(1, vocab, (2 * args.pairs, args.answer), generator=g)
    ids = torch.cat([prompt.repeat(2, 1), answers], dim=1)
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def lora_config(cls):
    return cls(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def load_peftctl(args):
    from peftctl import recipe as recipe_lib
    from peftctl.adapters import LoraConfig, attach
    from peftctl.loss import prepare
    from peftctl.preference import Objective, PairBatch, micro_step
    from peftctl.train import enable_gradient_checkpointing
    from peftctl.train.optim import build_optimizer

    model = attach(build_model(args), lora_config(LoraConfig))
    if args.kernels:  # train.kernels: auto, on with a CUDA GPU (the fused LoRA blocks)
        from peftctl.adapters.lora.fused import enable_fused

        enable_fused(model)
    enable_gradient_checkpointing(model)
    model.train()
    train_cfg = recipe_lib.TrainSection(objective="dpo", beta=0.1, lr=1e-5, optimizer="adamw")
    opt = build_optimizer(model, train_cfg)
    objective = Objective.of(train_cfg)
    pb = PairBatch(pairs_batch(args))

    def step():
        batch, plan = prepare(pb.batch, args.device)
        loss, _, _ = micro_step(objective, model, batch, plan, pb.lengths)
        (loss / pb.pairs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss / pb.pairs

    return step


def minimal_tokenizer(folder: Path):
    """A word-level tokenizer: TRL's trainer wants one (its data pipeline is not used here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


def load_trl(args):
    import peft
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    workdir = Path(args.workdir)
    cfg = DPOConfig(output_dir=str(workdir / "trl"), beta=0.1, loss_type=["sigmoid"], report_to=[],
                    bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=args.prompt + args.answer,
                    per_device_train_batch_size=args.pairs)
    trainer = DPOTrainer(model=build_model(args), args=cfg, peft_config=lora_config(peft.LoraConfig),
                         processing_class=minimal_tokenizer(workdir / "tok"),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=args.device == "cuda")
    batch = pairs_batch(args)
    inputs = {"input_ids": batch["input_ids"].to(args.device), "attention_mask": batch["attention_mask"].to(args.device),
              "completion_mask": (batch["labels"] != -100).long().to(args.device)}

    def step():
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_one(args) -> dict:
    import resource

    import torch

    start = time.perf_counter()
    step = (load_trl if args.impl == "trl" else load_peftctl)(args)
    load_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = 2 * args.pairs * (args.prompt + args.answer)
    return {"impl": args.impl, "kernels": args.kernels if args.impl == "peftctl" else None, "model": args.model, "pairs": args.pairs, "prompt": args.prompt, "answer": args.answer,
            "tokens_per_s": tokens * args.steps / elapsed, "s_per_step": elapsed / args.steps,
            "peak_gib": peak / 2**30, "loss": float(loss), "load_s": load_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--answer", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--impls", default="peftctl,trl")
    p.add_argument("--workdir", default="/tmp/peftctl-bench-dpo")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, 2 pairs of 16 + 32 tokens")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="peftctl without its fused kernels")
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)  # a child: run one implementation
    args = p.parse_args()
    if args.tiny:
        args.model, args.pairs, args.prompt, args.answer, args.steps, args.warmup = "tiny", 2, 16, 32, 2, 1
        args.device = args.device or "cpu"
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.kernels = args.kernels and args.device == "cuda"
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, __file__, "--impl", impl, "--model", args.model, "--pairs", str(args.pairs),
               "--prompt", str(args.prompt), "--answer", str(args.answer), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--workdir", args.workdir,
               *([] if args.kernels else ["--no-kernels"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            rows.append({"impl": impl, "error": f"exit {proc.returncode}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r.get("impl") == "trl" and "error" not in r), None)
    print(f"{'impl':8} {'tokens/s':>10} {'s/step':>8} {'peak GiB':>9} {'loss':>8}  vs TRL")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:8} {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x speed, {r['peak_gib'] / base['peak_gib']:.2f}x memory" \
            if base else ""
        print(f"{r['impl']:8} {r['tokens_per_s']:10.0f} {r['s_per_step']:8.3f} {r['peak_gib']:9.2f} {r['loss']:8.4f}  {ratio}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=1) + "\n")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
