"""Print two `peftctl eval --json` results side by side; exit 1 unless the second clearly wins.

    python recipes/compare_evals.py BASE.json ADAPTER.json [--min-gain 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--min-gain", type=float, default=0.2, help="required exact-match gain (absolute)")
    args = ap.parse_args()
    with open(args.before) as f:
        before = json.load(f)
    with open(args.after) as f:
        after = json.load(f)
    print(f"{'':14}{'base':>10}{'adapter':>10}")
    for key in ("eval_loss", "perplexity", "exact_match"):
        if key in before and key in after:
            print(f"{key:14}{before[key]:10.4f}{after[key]:10.4f}")
    for s in after.get("samples", [])[:3]:
        print(f"  {'ok ' if s['correct'] else 'bad'} {s['prediction']!r} (reference {s['reference']!r})")
    gain = after.get("exact_match", 0.0) - before.get("exact_match", 0.0)
    if gain < args.min_gain:
        print(f"exact match improved by {gain:+.3f}, less than {args.min_gain}", file=sys.stderr)
        return 1
    print(f"held-out exact match: {before.get('exact_match', 0):.1%} -> {after['exact_match']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
