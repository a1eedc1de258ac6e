"""Preference pairs from the quickstart data: the ISO 8601 answer chosen, a wrong one rejected.

    python recipes/data/quickstart_preference/make.py     # rewrites train.jsonl and eval.jsonl here

Each quickstart row (a question and its ISO answer) becomes {prompt, chosen, rejected} with the
question as a one-message prompt and the answers as assistant messages. The rejected answer is, in
turn: day and month swapped (YYYY-DD-MM), the US form (MM/DD/YYYY), the year off by one, the day
off by one; every one of them is wrong. Deterministic: the same files every time.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "quickstart"


def wrong(iso: str, kind: int) -> str:
    y, m, d = (int(x) for x in iso.split("-"))
    if kind == 0 and d != m and d <= 12:
        return f"{y:04d}-{d:02d}-{m:02d}"
    if kind in (0, 1):
        return f"{m:02d}/{d:02d}/{y:04d}"
    if kind == 2:
        return f"{y + 1:04d}-{m:02d}-{d:02d}"
    return f"{y:04d}-{m:02d}-{d % 28 + 1:02d}"


def convert(name: str) -> int:
    rows = [json.loads(line) for line in (SOURCE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(HERE / name, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            user, answer = row["messages"][0], row["messages"][1]["content"]
            rejected = wrong(answer, i % 4)
            assert rejected != answer
            f.write(json.dumps({"prompt": [user], "chosen": [{"role": "assistant", "content": answer}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return len(rows)


if __name__ == "__main__":
    for name in ("train.jsonl", "eval.jsonl"):
        print(f"{name}: {convert(name)} pairs")
