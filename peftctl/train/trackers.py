"""Where metrics go besides metrics.jsonl: TensorBoard and MLflow, when the recipe enables them.

A tracker the recipe enables but that is not installed is an input error found before the run
starts, never a silent skip. Records are the metrics.jsonl objects: `step` plus train keys (loss,
lr, ...) or eval keys (eval_loss, ...).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from peftctl.errors import InputError

_NEEDS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or mlflow)"),
}


def check_installed(tracking) -> None:
    for name, (module, hint) in _NEEDS.items():
        if getattr(tracking, name) and importlib.util.find_spec(module) is None:
            raise InputError(f"tracking.{name} is true but the {module} package is not installed; {hint}")


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, folder: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed attempt wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            group = "eval" if key.startswith("eval_") else "train"
            self.writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, record["step"])

    def close(self, summary: dict[str, Any]) -> None:
        self.writer.close()


class MLflow:
    """Through MlflowClient (no global active run), into the recipe's store or RUN_DIR/mlruns."""

    def __init__(self, tracking, run_dir: Path, run_name: str, params: dict[str, Any], run_id: str | None):
        uri = tracking.mlflow_tracking_uri
        if uri is None:
            # MLflow 3 keeps the file store for existing users behind this switch; it is the one
            # store that needs no server and no database package, so offline CI runs can use it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.uri = uri
        if run_id is None:
            exp = self.client.get_experiment_by_name(tracking.mlflow_experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(tracking.mlflow_experiment)
            run = self.client.create_run(exp_id, run_name=run_name)
            run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:500]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=items[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"]) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, summary: dict[str, Any]) -> None:
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status"), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


def flat_params(recipe_dump: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, fields in recipe_dump.items():
        if isinstance(fields, dict):
            for k, v in fields.items():
                out[f"{section}.{k}"] = v
    return out
