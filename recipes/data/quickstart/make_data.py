"""Generate the quickstart data: rewrite a date written in words as an ISO 8601 date.

SmolLM2-135M-Instruct gets this wrong out of the box (it echoes the date, invents a year or adds
an explanation); a few minutes of LoRA on two CPU cores teach it the month numbers, the
zero-padding and the terse answer. The eval set holds dates that do not occur in training.

    python recipes/data/quickstart/make_data.py   # rewrites train.jsonl and eval.jsonl here
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

MONTHS = list(calendar.month_name)[1:]
QUESTIONS = [
    "Convert this date to ISO format (YYYY-MM-DD): {date}",
    "Write {date} as an ISO 8601 date.",
    "What is {date} in YYYY-MM-DD format?",
    "Rewrite the date in ISO 8601 (YYYY-MM-DD): {date}",
]


def surface(rng: random.Random, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    return rng.choice([
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{name[:3]} {day}, {year}",
        f"{day} {name[:3]} {year}",
    ])


def example(rng: random.Random, year: int, month: int, day: int) -> dict:
    question = rng.choice(QUESTIONS).format(date=surface(rng, year, month, day))
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"},
    ]}


def main(n_train: int = 400, n_eval: int = 64, seed: int = 1234) -> None:
    rng = random.Random(seed)
    dates: set[tuple[int, int, int]] = set()
    while len(dates) < n_train + n_eval:
        year, month = rng.randint(1900, 2099), rng.randint(1, 12)
        dates.add((year, month, rng.randint(1, calendar.monthrange(year, month)[1])))
    ordered = sorted(dates)
    rng.shuffle(ordered)
    here = Path(__file__).parent
    for name, chunk in (("train", ordered[:n_train]), ("eval", ordered[n_train:])):
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in chunk:
                f.write(json.dumps(example(rng, *d)) + "\n")


if __name__ == "__main__":
    main()
