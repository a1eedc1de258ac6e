"""recipes/compare_evals.py, the demos' pass/fail judge: the named metric must improve by --min-gain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "recipes" / "compare_evals.py"


def _judge(tmp_path, before: dict, after: dict, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "b.json").write_text(json.dumps(before))
    (tmp_path / "a.json").write_text(json.dumps(after))
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "b.json"), str(tmp_path / "a.json"), *args],
                          capture_output=True, text=True)


def test_the_named_metric_must_improve_by_the_minimum_gain(tmp_path):
    base = {"eval_loss": 1.39, "accuracy": 0.283, "f1": 0.177}
    trained = {"eval_loss": 0.44, "accuracy": 0.925, "f1": 0.921}
    ok = _judge(tmp_path, base, trained, "--metric", "accuracy")
    assert ok.returncode == 0, ok.stderr
    assert "held-out accuracy: 28.3% -> 92.5%" in ok.stdout
    small = _judge(tmp_path, base, {**trained, "accuracy": 0.40}, "--metric", "accuracy")
    assert small.returncode == 1 and "less than 0.2" in small.stderr
    # The default metric is exact match, which a classifier's results lack: a failure, not a pass.
    missing = _judge(tmp_path, base, trained)
    assert missing.returncode == 1 and "exact_match is not in both results" in missing.stderr
