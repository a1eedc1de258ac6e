"""A run's curves: drawn in the terminal as plain text, and as a PNG when matplotlib is installed.

Used at the end of every run and by `peftctl report RUN_DIR`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from peftctl.errors import InputError

IMAGE_NAME = "curves.png"


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a run's metrics.jsonl (`runs.read_metrics` checks each line)."""
    from peftctl.runs import read_metrics as records

    train, evals = [], []
    for record in records(run_dir):
        if "loss" in record:
            train.append(record)
        elif "eval_loss" in record:
            evals.append(record)
    return train, evals


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if isinstance(y, int | float) and math.isfinite(y)]


def chart(series: dict[str, tuple[str, list[tuple[float, float]]]], width: int = 60, height: int = 12) -> str:
    """Plain-text scatter chart: series name -> (marker character, [(x, y), ...])."""
    points = [p for _, pts in series.values() for p in _finite(pts)]
    if not points:
        return "(no points to draw)"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    grid = [[" "] * width for _ in range(height)]
    for marker, pts in series.values():
        for x, y in _finite(pts):
            col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
            row = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
            grid[row][col] = marker
    labels = [f"{y1:.4g}", f"{(y0 + y1) / 2:.4g}", f"{y0:.4g}"]
    pad = max(len(s) for s in labels)
    lines = []
    for i, row in enumerate(grid):
        label = labels[0] if i == 0 else labels[2] if i == height - 1 else labels[1] if i == height // 2 else ""
        lines.append(f"{label:>{pad}} |{''.join(row)}")
    lines.append(" " * pad + " +" + "-" * width)
    left, right = f"step {x0:g}", f"{x1:g}"
    lines.append(" " * (pad + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    legend = "   ".join(f"{marker} {name}" for name, (marker, _) in series.items())
    lines.append(" " * (pad + 2) + legend)
    return "\n".join(lines)


def curves(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    train, evals = read_metrics(run_dir)
    return {
        "loss": [(r["step"], r["loss"]) for r in train],
        "eval_loss": [(r["step"], r["eval_loss"]) for r in evals],
    }


def terminal_chart(run_dir: Path, width: int = 60, height: int = 12) -> str:
    c = curves(run_dir)
    series = {"train loss": ("*", c["loss"])}
    if c["eval_loss"]:
        series["eval loss"] = ("o", c["eval_loss"])
    return chart(series, width, height)


def write_image(run_dir: Path, path: Path | None = None) -> Path | None:
    """curves.png (train and eval loss, and the lr) when matplotlib is installed; else None."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from peftctl.fsio import atomic_file

    train, evals = read_metrics(run_dir)
    path = Path(path) if path else Path(run_dir) / IMAGE_NAME
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(Path(run_dir).resolve().name)
    ax_lr.plot([r["step"] for r in train], [r.get("lr") for r in train], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def report(run_dir: Path, image: bool = True) -> dict[str, Any]:
    """Everything `peftctl report` shows: summary, curves, the chart, and the image's path."""
    from peftctl.runs import read_summary

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder")
    summary = read_summary(run_dir)
    c = curves(run_dir)
    written = write_image(run_dir) if image and c["loss"] else None
    return {
        "run_dir": str(run_dir),
        "summary": summary,
        "loss": c["loss"],
        "eval_loss": c["eval_loss"],
        "chart": terminal_chart(run_dir),
        "image": str(written) if written else None,
    }
