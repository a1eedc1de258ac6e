"""`train(recipe)`: a recipe run end to end, in the order a reader expects.

Everything that can be wrong with the user's input (tokenizer, data rows, model, adapter targets)
is checked before the run folder is created, so a bad recipe leaves nothing behind; from then on
the folder always ends with a summary.json that says how the run ended.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

from peftctl.errors import InputError, PeftctlError, RuntimeFailure
from peftctl.fsio import atomic_write_text, refuse_nonempty
from peftctl.ui import Reporter


class RunFolder:
    """The run folder's files: recipe.yaml, metrics.jsonl, summary.json."""

    def __init__(self, path: Path):
        self.path = path

    def create(self, recipe_yaml: str) -> None:
        refuse_nonempty(self.path, "output.dir")  # again: something may have appeared while we loaded
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
        (self.path / "metrics.jsonl").touch()

    def write_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    import peftctl

    return {
        "peftctl": peftctl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def prepare_model(recipe, *, dtype=None, device_map=None):
    """Load the base model and tokenizer and attach a fresh adapter; input errors exit 2."""
    from peftctl import models
    from peftctl.adapters import attach

    model, tokenizer = models.load(recipe.model, dtype=dtype, device_map=device_map)
    config = recipe.adapter.model_copy(
        update={"base_model_name_or_path": models.base_model_reference(recipe.model)}
    )
    try:
        peft_model = attach(model, config)
    except (ValueError, TypeError) as e:
        raise InputError(f"adapter: {e}") from None
    return peft_model, tokenizer


def train(recipe, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run a recipe: load, attach, read data, train, save. Returns the summary."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from peftctl import data as data_lib
    from peftctl import models
    from peftctl.train.loop import fit

    reporter = reporter or Reporter()
    run = RunFolder(Path(recipe.output.dir))
    refuse_nonempty(run.path, "output.dir", hint="choose another (--set output.dir=...) or remove it")
    started = time.time()

    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    dtype = models.resolve_dtype(recipe.model.dtype)
    resolved = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"dtype": str(dtype).removeprefix("torch.")})}
    )
    set_seed(recipe.train.seed)
    reporter.log(f"loading {recipe.model.name_or_path} ({resolved.model.dtype})")
    model, tokenizer = prepare_model(recipe, dtype=dtype)
    dataset = data_lib.build(recipe.data, tokenizer, seed=recipe.train.seed,
                             attention=model.config._attn_implementation, reporter=reporter)
    trainable, total = model.get_nb_trainable_parameters()
    reporter.log(
        f"{len(dataset.train)} training examples, {len(dataset.eval or [])} eval examples; "
        f"trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )

    main = accelerator.is_main_process
    if main:
        run.create(resolved.to_yaml())
    summary: dict[str, Any] = {
        "status": "running",
        "run_dir": str(run.path.resolve()),
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(dataset.train),
        "eval_examples": len(dataset.eval or []),
        "data": {k: vars(v) for k, v in dataset.stats.items()},
    }
    try:
        result = fit(
            model, dataset.train, dataset.eval, resolved, accelerator, tokenizer.pad_token_id,
            run.write_metrics if main else (lambda record: None), reporter,
        )
        if main:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(run.path)
            tokenizer.save_pretrained(run.path)
        summary.update(
            status="completed",
            steps=result.steps,
            train_loss=result.train_loss,
            final_eval=result.evals[-1] if result.evals else None,
            tokens_seen=result.tokens_seen,
            loss_tokens_seen=result.loss_tokens_seen,
            tokens_per_s=result.tokens_per_s,
            train_time_s=result.wall_time_s,
        )
    except KeyboardInterrupt:
        summary.update(status="interrupted")
        raise
    except PeftctlError as e:
        summary.update(status="failed", error=str(e))
        raise
    except Exception as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise RuntimeFailure(f"training failed: {type(e).__name__}: {e}") from e
    finally:
        summary.update(
            wall_time_s=time.time() - started,
            peak_memory_bytes=peak_memory_bytes(accelerator.device),
            device=str(accelerator.device),
            num_processes=accelerator.num_processes,
            versions=versions(),
        )
        if main:
            run.write_summary(summary)
    return summary
