"""Preference pairs from the quickstart data: the ISO 8601 answer chosen, a wrong one rejected, the
wrong answers sampled from the quickstart's own SFT adapter (on-policy pairs, as DPO is used).

How the committed files were made (the second and third steps are this script):

    peftctl train recipes/quickstart.yaml                                  # the SFT adapter: runs/quickstart
    python recipes/data/quickstart_preference/make.py prompts OUT          # OUT/prompts-{train,eval}.jsonl
    for split in train eval; do for seed in 1 2 3 4; do
      peftctl generate runs/quickstart --input OUT/prompts-$split.jsonl --temperature 1.0 --seed $seed \\
          --max-new-tokens 16 -o OUT/$split-$seed.jsonl
    done; done
    python recipes/data/quickstart_preference/make.py collect OUT          # -> sft_samples.jsonl (here)
    python recipes/data/quickstart_preference/make.py                      # -> train.jsonl, eval.jsonl (here)

sft_samples.jsonl keeps, per split and row, the SFT adapter's sampled answers (temperature 1, seeds
1-4, in that order). A pair's rejected answer is the first sampled answer that is not the right
one: the mistakes that model makes (a day's digits swapped or dropped, a month off, ...). A row
whose samples were all right gets a made-up wrong answer instead, in turn: day and month swapped
(YYYY-DD-MM), the US form (MM/DD/YYYY), the year off by one, the day off by one. Deterministic
given sft_samples.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "quickstart"
SAMPLES = HERE / "sft_samples.jsonl"
SPLITS = ("train", "eval")
SEEDS = (1, 2, 3, 4)


def wrong(iso: str, kind: int) -> str:
    y, m, d = (int(x) for x in iso.split("-"))
    if kind == 0 and d != m and d <= 12:
        return f"{y:04d}-{d:02d}-{m:02d}"
    if kind in (0, 1):
        return f"{m:02d}/{d:02d}/{y:04d}"
    if kind == 2:
        return f"{y + 1:04d}-{m:02d}-{d:02d}"
    return f"{y:04d}-{m:02d}-{d % 28 + 1:02d}"


def rows(split: str) -> list[dict]:
    text = (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prompts(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(out / f"prompts-{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows(split):
                f.write(json.dumps([row["messages"][0]]) + "\n")


def collect(out: Path) -> None:
    with open(SAMPLES, "w", encoding="utf-8") as f:
        for split in SPLITS:
            runs = []
            for seed in SEEDS:
                lines = (out / f"{split}-{seed}.jsonl").read_text(encoding="utf-8").splitlines()
                runs.append([json.loads(line)["output"] for line in lines if line.strip()])
            for i, outputs in enumerate(zip(*runs, strict=True)):
                f.write(json.dumps({"split": split, "row": i + 1, "samples": list(outputs)}) + "\n")


def convert(split: str, samples: dict) -> tuple[int, int]:
    on_policy = 0
    with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows(split)):
            user, answer = row["messages"][0], row["messages"][1]["content"]
            sampled = [s for s in samples.get((split, i + 1), []) if s.strip() and s.strip() != answer]
            rejected = sampled[0].strip() if sampled else wrong(answer, i % 4)
            on_policy += bool(sampled)
            assert rejected != answer
            f.write(json.dumps({"prompt": [user], "chosen": [{"role": "assistant", "content": answer}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return len(rows(split)), on_policy


def main(argv: list[str]) -> None:
    if argv[:1] == ["prompts"]:
        return prompts(Path(argv[1]))
    if argv[:1] == ["collect"]:
        return collect(Path(argv[1]))
    samples = {}
    if SAMPLES.exists():
        for line in SAMPLES.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            samples[(r["split"], r["row"])] = r["samples"]
    for split in SPLITS:
        n, on_policy = convert(split, samples)
        print(f"{split}.jsonl: {n} pairs, {on_policy} with a rejected answer sampled from the SFT adapter")


if __name__ == "__main__":
    main(sys.argv[1:])
