"""The method comparison (bench/compare_methods.py over recipes/methods/): the recipes are valid and
differ only where the comparison says they do, and the script's step timing reads a run's metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from peftctl import recipe as recipe_lib

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "recipes" / "methods"


def _script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "bench" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_method_s_recipe_is_valid_and_differs_from_lora_s_only_in_adapter_and_lr():
    reference = yaml.safe_load((METHODS / "lora.yaml").read_text())
    found = sorted(p.stem for p in METHODS.glob("*.yaml"))
    assert {"lora", "dora", "ia3"} <= set(found)
    for name in found:
        path = METHODS / f"{name}.yaml"
        recipe = recipe_lib.load(path)  # valid, with the data paths resolved against the file
        assert all(Path(s.path).is_file() for s in (*recipe.data.train, *recipe.data.eval))
        assert Path(recipe.output.dir).name == name  # its own run folder
        raw = yaml.safe_load(path.read_text())
        for section in ("model", "data", "eval"):
            assert raw[section] == reference[section], (name, section)
        assert {k: v for k, v in raw["train"].items() if k != "lr"} == \
            {k: v for k, v in reference["train"].items() if k != "lr"}, name
        assert "Learning rate:" in path.read_text(), f"{name}.yaml must say how its rate was chosen"
    assert yaml.safe_load((METHODS / "ia3.yaml").read_text())["adapter"]["method"] == "ia3"
    assert yaml.safe_load((METHODS / "dora.yaml").read_text())["adapter"]["use_dora"] is True


def test_seconds_per_step_is_the_median_after_the_first_step(tmp_path):
    compare = _script()
    lines = [{"step": s, "loss": 1.0, "loss_tokens": 10, "elapsed_s": t}
             for s, t in ((1, 9.0), (2, 10.0), (3, 11.5), (5, 13.5), (6, 30.0))]
    lines.insert(2, {"step": 2, "eval_loss": 2.0})  # an eval line has no timing
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # Per-step times after step 1: 1.0, 1.5, 1.0 (two steps in 2 s), 16.5: median 1.25.
    assert compare.seconds_per_step(tmp_path) == pytest.approx(1.25)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert compare.seconds_per_step(tmp_path) is None
    assert compare.available()[:3] == ["lora", "dora", "ia3"]


def test_a_sweep_picks_each_method_s_lowest_eval_loss_and_reports_failed_rates():
    compare = _script()
    rows = [
        {"method": "lora", "lr": 1e-3, "eval_loss": 0.20, "exact_match": 0.5},
        {"method": "lora", "lr": 1e-2, "eval_loss": 0.10, "exact_match": 0.4},
        {"method": "lora", "lr": 1e-1, "failed": "exit 1", "eval_loss": None, "exact_match": None},
        {"method": "ia3", "lr": 1e-3, "eval_loss": 0.30, "exact_match": 0.2},
        {"method": "ia3", "lr": 1e-2, "eval_loss": 0.30, "exact_match": 0.6},  # a tie: higher exact match wins
    ]
    assert compare.best_rates(rows) == {"lora": 1e-2, "ia3": 1e-2}
    text = compare.sweep_table(rows, [1e-3, 1e-2, 1e-1])
    assert "| lora | 0.2000 / 50.0% | **0.1000 / 40.0%** | failed (exit 1) |" in text
    assert "| ia3 | 0.3000 / 20.0% | **0.3000 / 60.0%** | - |" in text


def test_each_method_s_recipe_uses_the_rate_its_sweep_chose():
    compare = _script()
    sweep = "\n".join((ROOT / "bench" / "results" / name).read_text()
                      for name in ("methods-lr-sweep.md", "methods-lr-sweep-prompt.md", "methods-lr-sweep-prefix.md"))
    chosen: dict[str, list[float]] = {}
    for line in sweep.splitlines():
        if not line.startswith("| ") or line.startswith(("| method", "|---")):
            continue
        method = line.split("|")[1].strip()
        header = [x for x in sweep.splitlines()[: sweep.splitlines().index(line)] if x.startswith("| method")][-1]
        rates = [float(c.strip().removeprefix("lr ")) for c in header.split("|")[2:-1]]
        cells = [c.strip() for c in line.split("|")[2:-1]]
        chosen.setdefault(method, []).extend(r for r, c in zip(rates, cells, strict=True) if c.startswith("**"))
    for method, rates in chosen.items():
        if not rates:  # every rate failed in every sweep: the recipe says its rate is untuned
            assert "NOT tuned" in (ROOT / "recipes" / "methods" / f"{method}.yaml").read_text(), method
        else:
            assert rates == [compare.recipe_lr(method)], method
