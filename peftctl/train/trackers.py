"""Where metrics go besides metrics.jsonl: TensorBoard, MLflow and Weights & Biases, when the recipe
enables them.

A tracker the recipe enables but that is not installed is an input error found before the run
starts, never a silent skip. Records are the metrics.jsonl objects: `step` plus train keys (loss,
lr, ...) or eval keys (eval_loss, ...).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import string
import time
from pathlib import Path
from typing import Any

from peftctl.errors import InputError

_NEEDS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or mlflow)"),
    "wandb": ("wandb", "pip install wandb"),
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


WANDB_CONNECT_S = 3.0


def wandb_mode(tracking) -> tuple[str, str | None]:
    """(online or offline, why offline when `tracking.wandb_mode` is auto). Online needs an API key
    (WANDB_API_KEY, or the one `wandb login` keeps in ~/.netrc) and the server (WANDB_BASE_URL, else
    api.wandb.ai) answering on its port within WANDB_CONNECT_S seconds."""
    if tracking.wandb_mode != "auto":
        return tracking.wandb_mode, None
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline"):
        return env, f"WANDB_MODE={env}" if env == "offline" else None
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or host in netrc.read_text(encoding="utf-8", errors="replace")
    except OSError:
        has_key = False
    if not has_key:
        return "offline", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), WANDB_CONNECT_S).close()
    except OSError as e:
        return "offline", f"{host} did not answer ({e.strerror or type(e).__name__})"
    return "online", None


class WandB:
    """One W&B run per training run, its id kept in the checkpoints (`TrainState.trackers`) so that a
    resumed run continues it; its files in RUN_DIR/wandb. Metrics are logged at the run's step, train
    keys under train/, eval keys under eval/ (as in TensorBoard); W&B's console capture is off (the
    `--json` output on stdout stays one object)."""

    def __init__(self, tracking, run_dir: Path, run_name: str, params: dict[str, Any], run_id: str | None):
        import wandb

        self.mode, self.why_offline = wandb_mode(tracking)
        # W&B's own ids: 8 characters of [a-z0-9]
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.run = wandb.init(
            project=tracking.wandb_project, entity=tracking.wandb_entity, name=run_name, id=run_id,
            resume="allow", dir=str(run_dir), config=params, mode=self.mode,
            settings=wandb.Settings(console="off", silent=True, save_code=False),
        )
        self.run_id = run_id
        self.dir = str(Path(self.run.dir).parent)  # RUN_DIR/wandb/<offline-run|run>-<time>-<id>

    def log(self, record: dict[str, Any]) -> None:
        values = {f"{'eval' if k.startswith('eval_') else 'train'}/{k.removeprefix('eval_')}": v
                  for k, v in _numbers(record).items()}
        if values:
            self.run.log(values, step=record["step"])

    def close(self, summary: dict[str, Any]) -> None:
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)


def flat_params(recipe_dump: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, fields in recipe_dump.items():
        if isinstance(fields, dict):
            for k, v in fields.items():
                out[f"{section}.{k}"] = v
    return out
