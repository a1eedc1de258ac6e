"""Train each adapter method's recipe and write the comparison table to docs/METHODS.md.

    python bench/compare_methods.py                              # every recipes/methods/*.yaml as written
    python bench/compare_methods.py --methods lora,ia3 --steps 10

Every recipe under recipes/methods/ trains the built-in model on the quickstart data; they differ
only in `adapter` and `train.lr` (each recipe's comment says how its rate was chosen). For each:
`peftctl train` into OUT/<method> (logging every step), then `peftctl eval --adapter` on the
held-out file for exact match. The table gives trainable parameters, the adapter file's size,
seconds per optimizer step (the median over the steps after the first, from metrics.jsonl, so the
first step's warm-up and a busy moment of a shared machine weigh little), held-out exact match and
eval loss, and the base model's row (`peftctl eval --base`; `--no-base` skips it). The document
records the command, the machine and its load, so that anyone can rerun it.

`--sweep LR,LR,...` trains every method at each learning rate instead (runs OUT/<method>-lr<LR>) and
writes the sweep's table (held-out eval loss and exact match per method and rate, the rate with the
lowest eval loss marked) to `--doc` (default bench/results/methods-lr-sweep.md): how the recipes' rates
were chosen. `--set KEY=VALUE` (repeatable) passes a recipe override to every train and eval, e.g.
`--set model.name_or_path=/data/SmolLM2-135M-Instruct.Q4_1.gguf` where the built-in package is not
installed, or `--set model.dtype=float32`; `--jobs N` runs N methods at once (on a GPU machine).

`--steps N` shortens every run (train.max_steps=N; warm-up capped at N // 4): the numbers then say
that the script works, not how the methods compare. Run it with the venv's Python (with the
repository's code on PYTHONPATH when peftctl is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "methods"
# The table's order: LoRA first (the reference), then the others as issue 11 lists them.
ORDER = ["lora", "dora", "ia3", "adalora", "vera", "loha", "lokr", "prompt_tuning", "p_tuning", "prefix_tuning"]


def available() -> list[str]:
    found = [p.stem for p in RECIPES.glob("*.yaml")]
    return sorted(found, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def peftctl(*args: str) -> dict:
    """Run `peftctl ARGS --json` with this Python; its JSON result, or exit naming the failure."""
    cmd = [sys.executable, "-m", "peftctl", *args, "--json"]
    print("+", shlex.join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: the run's progress, shown
    if proc.returncode != 0:
        raise RunFailed(f"compare_methods: {shlex.join(cmd[1:])} failed (exit {proc.returncode})",
                        proc.returncode)
    return json.loads(proc.stdout)


class RunFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def seconds_per_step(run_dir: Path) -> float | None:
    """Median wall time of one optimizer step after the first (None: fewer than 2 steps logged)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [(x["step"], x["elapsed_s"]) for x in lines if "elapsed_s" in x and "loss_tokens" in x]
    deltas = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(steps, steps[1:], strict=False) if s1 > s0]
    return statistics.median(deltas) if deltas else None


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def measure(method: str, out: Path, steps: int | None, eval_examples: int | None,
            lr: float | None = None, extra: tuple[str, ...] = ()) -> dict:
    recipe = RECIPES / f"{method}.yaml"
    run_dir = out / (method if lr is None else f"{method}-lr{lr:g}")
    overrides = [*extra, f"output.dir={run_dir}", "train.log_every=1", "train.eval_every=null"]
    if steps is not None:
        overrides += [f"train.max_steps={steps}", f"train.warmup_steps={steps // 4}"]
    if lr is not None:
        overrides.append(f"train.lr={lr!r}")
    summary = peftctl("train", str(recipe), *sets(overrides))
    eval_sets = [*extra, *([f"eval.max_examples={eval_examples}"] if eval_examples else [])]
    result = peftctl("eval", str(recipe), "--adapter", str(run_dir), *sets(eval_sets))
    config = json.loads((run_dir / "adapter_config.json").read_text())
    return {
        "method": method,
        "lr": recipe_lr(method) if lr is None else lr,
        "peft_type": config.get("peft_type"),
        "steps": summary.get("steps"),
        "trainable_params": summary.get("trainable_params"),
        "adapter_bytes": (run_dir / "adapter_model.safetensors").stat().st_size,
        "seconds_per_step": seconds_per_step(run_dir),
        "exact_match": result.get("exact_match"),
        "eval_loss": result.get("eval_loss"),
        "exact_match_n": result.get("exact_match_n"),
    }


def recipe_lr(method: str) -> float:
    import yaml

    return yaml.safe_load((RECIPES / f"{method}.yaml").read_text())["train"]["lr"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def match(r: dict) -> str:
    return "-" if r.get("exact_match") is None else f"{r['exact_match']:.1%} of {r['exact_match_n']}"


def table(rows: list[dict], base: dict | None) -> str:
    out = ["| method | trainable params | adapter file | s / step | held-out exact match | eval loss | lr |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    if base is not None:
        out.append(f"| base model (no adapter) | 0 | - | - | {match(base)} | "
                   f"{fmt(base.get('eval_loss'), '.4f')} | - |")
    for r in rows:
        out.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['adapter_bytes'] / 1024:,.1f} KiB | "
            f"{fmt(r['seconds_per_step'], '.2f')} | {match(r)} | {fmt(r['eval_loss'], '.4f')} | "
            f"{r['lr']:g} |"
        )
    return "\n".join(out)


def best_rates(rows: list[dict]) -> dict[str, float]:
    """Each method's rate with the lowest held-out eval loss (ties: higher exact match, then lower rate)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("failed"):
            continue
        key = (r["eval_loss"] if r["eval_loss"] is not None else float("inf"), -(r["exact_match"] or 0.0), r["lr"])
        if r["method"] not in best or key < best[r["method"]]["_key"]:
            best[r["method"]] = {**r, "_key": key}
    return {m: r["lr"] for m, r in best.items()}


def sweep_table(rows: list[dict], rates: list[float]) -> str:
    best = best_rates(rows)
    head = "| method | " + " | ".join(f"lr {x:g}" for x in rates) + " |"
    out = [head, "|---|" + "---:|" * len(rates)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for x in rates:
            r = next((r for r in rows if r["method"] == method and r["lr"] == x), None)
            if r is None or r.get("failed"):
                cells.append("-" if r is None else f"failed ({r['failed']})")
                continue
            cell = f"{fmt(r['eval_loss'], '.4f')} / {fmt(r['exact_match'], '.1%')}"
            cells.append(f"**{cell}**" if best.get(method) == x else cell)
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sweep_document(rows: list[dict], rates: list[float], argv: list[str], load, minutes: float,
                   steps: int | None) -> str:
    import torch

    command = "python bench/compare_methods.py " + shlex.join(argv)
    device = (f"{torch.cuda.get_device_name(0)} (GPU), " if torch.cuda.is_available() else "") + \
        f"{os.cpu_count()} CPU cores ({cpu_name()})"
    short = f" **Shortened** to {steps} steps: the numbers show that the script works." if steps else ""
    return f"""# Learning-rate sweep of the method comparison

Produced by `bench/compare_methods.py --sweep` (do not edit by hand; rerun it):

    {command}

Each method's recipe under `recipes/methods/` trained at each rate (everything else as written), then
`peftctl eval --adapter` on the held-out file. Each cell: held-out eval loss / exact match. In bold, the
rate with the lowest eval loss (ties: higher exact match): the rate the method's recipe uses. The held-out
file is also the table's test set, so every method's row in docs/METHODS.md is tuned on it alike.{short}

{sweep_table(rows, rates)}

Machine: {device}, torch {torch.__version__}, {platform.system()}; load average at the start
{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; the sweep ran {minutes:.1f} minutes.
"""


def document(rows: list[dict], base: dict | None, argv: list[str], load: tuple[float, float, float],
             minutes: float, steps: int | None) -> str:
    import torch

    command = "python bench/compare_methods.py" + ("" if not argv else " " + shlex.join(argv))
    short = (f"\n**A shortened run** (`--steps {steps}`): these numbers show that the script works; they do "
             "not compare the methods. The comparison is the run without `--steps`.\n" if steps else "")
    return f"""# Adapter methods compared

Produced by `bench/compare_methods.py` (do not edit by hand; rerun it):

    {command}

Each method's recipe is `recipes/methods/<method>.yaml`: the built-in model (SmolLM2-135M-Instruct)
trained on the quickstart data (`recipes/data/quickstart`, 400 training and 64 held-out chat rows: write a
date in ISO 8601 form), with the quickstart's schedule; the recipes differ only in `adapter` and
`train.lr`. Each rate is the lowest held-out eval loss of one sweep over 1e-4 ... 1e-1 for every method
(`--sweep`, bench/results/methods-lr-sweep.md, run on a GPU in float32): the held-out file is also
this table's test set, so every row is tuned on it alike. Held-out exact match: greedy answers of
`peftctl eval --adapter` equal to the reference. Seconds per step: the median over the steps after the
first, from the run's metrics.jsonl. Adapter file: adapter_model.safetensors (float32).
{short}
{table(rows, base)}

Machine: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, {platform.system()}.
Load average when the script started: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min):
the seconds per step are only comparable within one table. The script ran {minutes:.1f} minutes.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", help=f"comma-separated subset (default: all of {', '.join(available())})")
    ap.add_argument("--steps", type=int, help="shorten every run to this many optimizer steps (>= 2)")
    ap.add_argument("--eval-examples", type=int, help="score exact match on only the first N held-out rows")
    ap.add_argument("--no-base", action="store_true", help="skip the base model's row")
    ap.add_argument("--out", type=Path, help="folder for the runs (must not exist; default runs/methods-<time>)")
    ap.add_argument("--doc", type=Path, help="where the table goes (default docs/METHODS.md, or "
                    "bench/results/methods-lr-sweep.md with --sweep)")
    ap.add_argument("--sweep", help="comma-separated learning rates: train every method at each (a sweep)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every train and eval (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="methods trained at once (default 1: timings need it)")
    ap.add_argument("--with-rows", type=Path, help="an earlier run's OUT/rows.jsonl: its methods not run now join "
                    "the table (the document says so)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",") if args.methods else available()
    unknown = [m for m in methods if m not in available()]
    if unknown:
        ap.error(f"no recipe for {', '.join(unknown)} under {RECIPES} (have: {', '.join(available())})")
    if args.steps is not None and args.steps < 2:
        ap.error("--steps must be at least 2 (seconds per step skip the first)")
    out = args.out or ROOT / "runs" / time.strftime("methods-%Y%m%d-%H%M%S")
    if out.exists():
        ap.error(f"{out} exists; give a new --out folder")
    if any("=" not in o for o in args.overrides):
        ap.error("--set takes KEY=VALUE")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    try:
        rates = [float(x) for x in args.sweep.split(",")] if args.sweep else None
    except ValueError:
        ap.error(f"--sweep takes comma-separated numbers, not {args.sweep!r}")
    if rates is not None and (not rates or any(not 0 < x < 1 for x in rates)):
        ap.error("--sweep rates must be in (0, 1)")
    doc = args.doc or (ROOT / "bench" / "results" / "methods-lr-sweep.md" if rates else ROOT / "docs" / "METHODS.md")
    load, start = os.getloadavg(), time.monotonic()
    extra = tuple(args.overrides)
    base = None
    if not args.no_base and rates is None:
        eval_sets = [*extra, *([f"eval.max_examples={args.eval_examples}"] if args.eval_examples else [])]
        base = peftctl("eval", str(RECIPES / f"{methods[0]}.yaml"), "--base", *sets(eval_sets))
    jobs = [(m, x) for m in methods for x in (rates or [None])]
    out.mkdir(parents=True)
    lock = threading.Lock()

    def one(job: tuple[str, float | None]) -> dict:
        try:
            row = measure(job[0], out, args.steps, args.eval_examples, job[1], extra)
        except RunFailed as e:
            if rates is None:
                raise
            # In a sweep a rate may diverge (train exits 1): that is a result, not the script's failure.
            row = {"method": job[0], "lr": job[1], "failed": f"exit {e.code}", "eval_loss": None,
                   "exact_match": None}
        with lock, (out / "rows.jsonl").open("a", encoding="utf-8") as f:  # what is done survives a kill
            f.write(json.dumps(row) + "\n")
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job is a subprocess
        try:
            rows = list(pool.map(one, jobs))
        except RunFailed as e:
            sys.exit(str(e))
    minutes = (time.monotonic() - start) / 60
    if args.with_rows is not None:
        earlier = [json.loads(x) for x in args.with_rows.read_text().splitlines() if x.strip()]
        ran = {r["method"] for r in rows}
        rows = sorted([*rows, *(r for r in earlier if r["method"] not in ran)],
                      key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER), r["method"]))
    if rates is not None:
        text = sweep_document(rows, rates, argv, load, minutes, args.steps)
        print(sweep_table(rows, rates))
    else:
        text = document(rows, base, argv, load, minutes, args.steps)
        if args.with_rows is not None:
            text += (f"\nThe rows of {', '.join(sorted({r['method'] for r in rows} - ran))} come from an earlier run "
                     f"of the script ({args.with_rows}, its own machine load).\n")
        print(table(rows, base))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
    print(f"written: {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
