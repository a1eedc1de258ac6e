"""`peftctl train --num-processes N`: the same run as
`accelerate launch --multi_gpu --num_processes N -m peftctl train RECIPE ...`, launched for you.

accelerate starts one process per GPU (NCCL), or on a machine without GPUs N CPU processes (gloo).
The launcher runs in its own session, so a Ctrl-C in the terminal reaches the workers once, through
this process (forwarded), never twice (a second signal stops a run at once). The exit code follows
the run's summary.json: 0 completed, 1 diverged or failed, 128 + signal when interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port no one listens on now, for this launch's process group: accelerate's default
    (29500) is shared by every launch on the host, and two launches starting together can both
    see it free, and then the second one's processes join the first one's group and wait."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(num_processes: int, train_args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--main_process_port", str(free_port()),
        "--mixed_precision", "no",  # precision comes from the recipe (model.dtype)
        "--dynamo_backend", "no",
        "-m", "peftctl", "train", *train_args,
    ]


def check_devices(num_processes: int) -> None:
    """InputError when this machine has GPUs but fewer than `num_processes`: each process takes one
    GPU (NCCL refuses two on one device); without a GPU the processes share the host (gloo)."""
    import torch

    from peftctl.errors import InputError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < num_processes:
        raise InputError(f"--num-processes {num_processes}: each process takes one GPU and this machine has "
                         f"{gpus} visible (CUDA_VISIBLE_DEVICES); use --num-processes {gpus} or fewer, or "
                         "CUDA_VISIBLE_DEVICES= to train on the CPU (gloo)")


def launch(num_processes: int, train_args: list[str], run_dir: Path) -> int:
    started = time.time()
    proc = subprocess.Popen(accelerate_command(num_processes, train_args), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    summary_path = run_dir / "summary.json"
    status = None
    if summary_path.is_file() and summary_path.stat().st_mtime >= started:  # not an earlier attempt's
        status = json.loads(summary_path.read_text(encoding="utf-8")).get("status")
    if status == "completed":
        return 0
    if status == "interrupted":
        return 128 + (received[0] if received else signal.SIGTERM)
    return code if code in (1, 2) else 1
