"""Choose the shipped preference recipe's settings: train the quickstart's SFT adapter once, then DPO
(or another objective) from it over a grid of settings, and evaluate every run on the held-out pairs.

    python bench/preference_sweep.py OUT --grid "train.lr=1e-4,5e-4" --grid "train.beta=0.1,0.5" \\
        [--grid "train.rpo_alpha=0,1"] [--set KEY=VALUE ...] [--jobs N] [--sft DIR]

Each run is `peftctl train recipes/dpo.yaml` with one combination of the grid's values (and every
`--set`) and `train.init_adapter` pointed at the SFT adapter, then `peftctl eval --json` of it. The
table (OUT/preference-sweep.md, rows in OUT/rows.jsonl as they finish) gives per combination the
held-out exact match of the chosen answers (generated, greedy), eval_rewards/accuracies and margins,
eval_logps/chosen and /rejected, against the SFT adapter's exact match; a failed run is a row that
says so. The reference of dpo / ipo is the SFT adapter, so reward accuracy is 0 before DPO by
definition: exact match is what tells whether the model got better at the task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SFT_RECIPE = ROOT / "recipes" / "quickstart.yaml"
PREF_RECIPE = ROOT / "recipes" / "dpo.yaml"
COLUMNS = ("exact_match", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
           "eval_logps/rejected", "eval_loss")


def peftctl(*args: str) -> dict | None:
    """`peftctl ARGS --json`'s result, or None when it failed (its stderr is shown)."""
    cmd = [sys.executable, "-m", "peftctl", *args, "--json"]
    print("+", shlex.join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def one(out: Path, combo: tuple[str, ...], sft: Path, overrides: list[str]) -> dict:
    name = "_".join(c.split(".")[-1].replace("=", "") for c in combo) or "default"
    run_dir = out / name
    extra = [*overrides, *combo, f"train.init_adapter={sft}", f"output.dir={run_dir}"]
    row = {"settings": list(combo)}
    if peftctl("train", str(PREF_RECIPE), *sets(extra)) is None:
        return {**row, "failed": True}
    result = peftctl("eval", str(PREF_RECIPE), "--adapter", str(run_dir), *sets(extra))
    if result is None:
        return {**row, "failed": True}
    return {**row, **{k: result.get(k) for k in COLUMNS}}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--sft", type=Path, help="an existing SFT run folder (default: train one into OUT/sft)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    axes = []
    for g in args.grid:
        key, _, values = g.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    sft = args.sft or args.out / "sft"
    if args.sft is None and not (sft / "adapter_config.json").exists():
        if peftctl("train", str(SFT_RECIPE), *sets([*args.overrides, f"output.dir={sft}"])) is None:
            sys.exit("preference_sweep: the SFT run failed")
    base = peftctl("eval", str(SFT_RECIPE), "--adapter", str(sft), *sets(args.overrides)) or {}
    rows_file = args.out / "rows.jsonl"
    rows = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(lambda c: one(args.out, c, sft, args.overrides), list(itertools.product(*axes))):
            rows.append(row)
            with open(rows_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    lines = [f"SFT adapter ({sft}): held-out exact match {fmt(base.get('exact_match'))}, "
             f"eval loss {fmt(base.get('eval_loss'))}", "",
             f"Preference runs from it ({PREF_RECIPE.name} with {' '.join(args.overrides) or 'no overrides'}):", "",
             "| settings | " + " | ".join(c.removeprefix("eval_") for c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = ["failed"] * len(COLUMNS) if row.get("failed") else [fmt(row.get(c)) for c in COLUMNS]
        lines.append(f"| {' '.join(row['settings'])} | " + " | ".join(cells) + " |")
    (args.out / "preference-sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
