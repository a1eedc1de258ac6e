"""Tokenizing chat data: the first build (render, tokenize, label, write the cache) and the second
(a cache hit), on generated multi-turn conversations of about 300 tokens, beside the floor: the
same texts through the Rust tokenizer alone (rendered beforehand, untimed).

    PYTHONPATH=. python bench/data_pipeline.py [--rows 100000] [--tokenizer FOLDER] [--json]

The tokenizer defaults to the built-in model's (converted once into the peftctl cache). The data
and the cache go to a temporary folder, removed at the end. Prints the wall times, rows and tokens
per second, and the machine's load average (other work on the cores slows the first build).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all "
         "they their one has more can will about would there been if some when into other time so only than "
         "what its also could two may then first any like new these most after over such data model train "
         "token answer question because through while where between each under before").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": "You answer briefly."}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2))):
                messages.append({"role": "user", "content": " ".join(sentence(rng, 12) for _ in range(rng.randint(3, 6)))})
                messages.append({"role": "assistant",
                                 "content": " ".join(sentence(rng, 14) for _ in range(rng.randint(6, 12)))})
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the built-in model's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from peftctl import models
    from peftctl.data.pipeline import build
    from peftctl.recipe import DataSection, ModelSection

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tokenizer = models.load_tokenizer(ModelSection())
        path = tmp / "chat.jsonl"
        write_rows(path, args.rows)
        cfg = DataSection(train=str(path), format="chat", max_length=1024, cache_dir=str(tmp / "cache"))
        load_before = os.getloadavg()
        with open(path, encoding="utf-8") as f:
            texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in f]
        tb = time.perf_counter()
        for i in range(0, len(texts), 1000):
            tokenizer._tokenizer.encode_batch(texts[i : i + 1000], add_special_tokens=False)
        tokenizer_alone = time.perf_counter() - tb
        del texts
        t0 = time.perf_counter()
        first = build(cfg, tokenizer)
        t1 = time.perf_counter()
        second = build(cfg, tokenizer)
        t2 = time.perf_counter()
        s = first.stats["train"]
        assert second.stats["train"].from_cache == 1 and len(second.train) == len(first.train)
        result = {
            "rows": s.rows, "examples": s.examples, "tokens": s.tokens, "loss_tokens": s.loss_tokens,
            "tokens_per_example": round(s.tokens / max(s.examples, 1), 1),
            "tokenizer_alone_s": round(tokenizer_alone, 2),
            "first_build_s": round(t1 - t0, 2), "second_build_s": round(t2 - t1, 3),
            "rows_per_s": round(s.rows / (t1 - t0)), "tokens_per_s": round(s.tokens / (t1 - t0)),
            "file_mb": round(path.stat().st_size / 2**20, 1), "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
