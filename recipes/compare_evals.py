"""Print two `peftctl eval --json` results side by side; exit 1 unless the second clearly wins.

    python recipes/compare_evals.py BASE.json ADAPTER.json [--metric accuracy] [--min-gain 0.2]

--metric names the score that must improve (default exact_match; accuracy or f1 for a classifier).
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--metric", default="exact_match", help="the score that must improve (default exact_match)")
    ap.add_argument("--min-gain", type=float, default=0.2, help="required gain of --metric (absolute)")
    args = ap.parse_args()
    with open(args.before) as f:
        before = json.load(f)
    with open(args.after) as f:
        after = json.load(f)
    print(f"{'':14}{'base':>10}{'adapter':>10}")
    for key in dict.fromkeys(("eval_loss", "perplexity", "exact_match", "accuracy", "f1", args.metric)):
        if key in before and key in after:
            print(f"{key:14}{before[key]:10.4f}{after[key]:10.4f}")
    for s in after.get("samples", [])[:3]:
        print(f"  {'ok ' if s['correct'] else 'bad'} {s['prediction']!r} (reference {s['reference']!r})")
    metric = args.metric
    if metric not in before or metric not in after:
        print(f"{metric} is not in both results (have: {', '.join(sorted(after))})", file=sys.stderr)
        return 1
    gain = after[metric] - before[metric]
    if gain < args.min_gain:
        print(f"{metric} improved by {gain:+.3f}, less than {args.min_gain}", file=sys.stderr)
        return 1
    print(f"held-out {metric.replace('_', ' ')}: {before[metric]:.1%} -> {after[metric]:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
