"""`train(recipe)`: a recipe run end to end, in the order a reader expects.

Everything that can be wrong with the user's input (the output folder, a checkpoint to resume and
whether the recipe still fits it, trackers, tokenizer, data rows, model, adapter targets) is
checked before the run folder is created or touched, so bad input leaves nothing behind; from then
on the folder always ends with a summary.json that says how the run ended: completed, interrupted
(a signal), diverged (NaN/inf) or failed. Only the main process writes files and logs.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

from peftctl.errors import InputError, PeftctlError, RuntimeFailure
from peftctl.fsio import atomic_write_text, check_output_dir, is_nonempty_dir, refuse_nonempty
from peftctl.ui import Reporter


class RunFolder:
    """The run folder's own files: recipe.yaml, metrics.jsonl, summary.json."""

    def __init__(self, path: Path):
        self.path = path

    def create(self, recipe_yaml: str) -> None:
        refuse_nonempty(self.path, "output.dir")  # again: something may have appeared while we loaded
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
        (self.path / "metrics.jsonl").touch()

    def reopen(self, recipe_yaml: str, step: int) -> list[str]:
        """Continue a run from its checkpoint at `step`: drop what was written after it (metrics
        lines, later checkpoints). Returns the names of the checkpoints removed."""
        from peftctl.train import checkpoint

        removed = checkpoint.clear_after(self.path, step)
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
        metrics = self.path / "metrics.jsonl"
        lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass  # the half line a kill left behind
        atomic_write_text(metrics, "".join(x + "\n" for x in kept))
        return removed

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
    from peftctl.adapters import TaskType, attach, io

    model, tokenizer = models.load(recipe.model, dtype=dtype, device_map=device_map)
    base_vocab = io.vocabulary_rows(model)  # before anything resizes the embeddings
    config = recipe.adapter.model_copy(update={
        "base_model_name_or_path": models.base_model_reference(recipe.model),
        "task_type": recipe.adapter.task_type or TaskType.CAUSAL_LM.value,  # runs train causal LMs
    })
    try:
        peft_model = attach(model, config)
    except (ValueError, TypeError) as e:
        raise InputError(f"adapter: {(str(e).splitlines() or [''])[0]}") from None  # torch adds C++ frames
    # Saving compares the vocabulary with this: embeddings resized for new tokens are saved too.
    peft_model.base_model.base_vocab_size = base_vocab
    return peft_model, tokenizer


def resolved(recipe):
    """The recipe as it runs: `auto` dtypes replaced by the dtype this machine gives them, and
    `train.gradient_checkpointing` decided (unset: on for a quantized base)."""
    from peftctl import models

    dtype = str(models.resolve_dtype(recipe.model.dtype)).removeprefix("torch.")
    model = {"dtype": dtype}
    q = recipe.model.quantization
    if q is not None and q.bits == 4 and q.compute_dtype == "auto":
        model["quantization"] = q.model_copy(update={"compute_dtype": dtype})
    checkpointing = recipe.uses_gradient_checkpointing()
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update=model),
        "train": recipe.train.model_copy(update={"gradient_checkpointing": checkpointing}),
    })


def data_hashes(data_cfg) -> dict[str, str]:
    """One content digest per split over its local sources (hub sources are pinned by name).

    Keyed like the recipe's `data.train` / `data.eval`, so that a moved file with the same content
    is recognised as the same data when resuming.
    """
    import hashlib

    from peftctl.data.sources import resolve

    out = {}
    for name in ("train", "eval"):
        sources = [resolve(s.path, split=s.split, subset=s.subset, text_sample_by=data_cfg.text_sample_by)
                   for s in getattr(data_cfg, name) or []]
        if sources and all(s.kind != "hub" for s in sources):
            digest = hashlib.sha256()
            for s in sources:
                digest.update(s.fingerprint().encode())
            out[name] = digest.hexdigest()
    return out


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (None: start fresh), or an input error saying why not."""
    from peftctl.train import checkpoint

    check_output_dir(run_dir, "output.dir")
    if resume is None:
        refuse_nonempty(run_dir, "output.dir", hint="resume it with --resume auto, choose another "
                        "(--set output.dir=...) or remove it")
        return None
    if resume == "auto":
        found = checkpoint.latest(run_dir)
        if found is None and is_nonempty_dir(run_dir):
            raise InputError(f"--resume auto: output.dir {run_dir} holds no complete checkpoint to resume "
                             "from; choose another output.dir or remove it")
        return found
    ckpt = Path(resume)
    if not (ckpt / checkpoint.STATE_FILE).is_file():
        raise InputError(f"--resume {resume}: not a checkpoint folder (no {checkpoint.STATE_FILE}); "
                         f"checkpoints are RUN_DIR/{checkpoint.CHECKPOINTS}/step-NNNNNN")
    if ckpt.resolve().parent.parent != run_dir.resolve():
        refuse_nonempty(run_dir, "output.dir", hint="a checkpoint of another run continues into a new folder")
    return ckpt


def check_resume_fits(ckpt: Path, recipe_dump: dict, hashes: dict[str, str], reporter: Reporter) -> None:
    from peftctl.train import checkpoint

    state, saved = checkpoint.check(ckpt)  # every file it holds, before anything loads
    refusals, notes = checkpoint.compare(saved, recipe_dump, state.data_sha256, hashes)
    if refusals:
        raise InputError(f"cannot resume from {ckpt}: the recipe changed in ways that make it another run:\n"
                         + "\n".join(f"  {r}" for r in refusals))
    if notes:
        reporter.log(f"resuming from {ckpt.name} with recipe changes: " + "; ".join(notes))


# Checks `train` makes before it creates the run folder, shared with `train --dry-run` (plan.py),
# which makes train's checks in train's order (with the model on the meta device): what one refuses
# before the first step, the other refuses with the same message and exit code.


def check_model(recipe, model, tokenizer) -> None:
    """The model with its adapter (loaded, or on the meta device) against the tokenizer: every token
    has an embedding row."""
    from peftctl import models

    models.check_tokenizer_fits(tokenizer, model, recipe.model)


def check_data(dataset, num_processes: int) -> None:
    if len(dataset.train) < num_processes:
        raise InputError(f"{len(dataset.train)} training examples cannot feed {num_processes} processes")


def enable_gradient_checkpointing(peft_model) -> None:
    base = peft_model.get_base_model()
    # Non-reentrant checkpointing needs no inputs that require grad; transformers still hooks the
    # input embeddings to require grad (frozen embeddings otherwise cut the graph for the reentrant
    # variant), which costs one small tensor. The model must be in train mode for it to act: fit()
    # puts it there.
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    base.config.use_cache = False


def save_final(run_dir: Path, peft_model, tokenizer, state, cfg, fsdp: bool, main: bool, reporter: Reporter) -> None:
    """The run's adapter (the last, or the best evaluation's with load_best_at_end) and tokenizer."""
    from peftctl.train import checkpoint

    use_best = cfg.load_best_at_end and state.best_step is not None
    # Under FSDP every process takes part in gathering the adapter; the main one writes it.
    tensors = checkpoint.adapter_state(peft_model) if fsdp and not use_best else None
    if not main:
        return
    if use_best:
        checkpoint.copy_adapter(run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(state.best_step), run_dir)
        reporter.log(f"the run's adapter is the best one, from step {state.best_step}")
    elif tensors is not None:
        checkpoint.save_adapter(peft_model, tensors, run_dir)
    else:
        peft_model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)


def train(recipe, reporter: Reporter | None = None, resume: str | None = None) -> dict[str, Any]:
    """Run a recipe: load, attach, read data, train, save. Returns the summary.

    `resume`: None (a new run: output.dir must be new or empty), "auto" (the latest checkpoint in
    output.dir, or a new run when there is none), or a checkpoint folder.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed

    from peftctl import data as data_lib
    from peftctl import models
    from peftctl.train import checkpoint, report, trackers
    from peftctl.train.loop import Diverged, fit, total_steps
    from peftctl.train.optim import build_optimizer, build_scheduler
    from peftctl.train.signals import Interrupted, StopNow, StopRequest

    started = time.time()
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    reporter = (reporter or Reporter()) if main else Reporter()
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not getattr(accelerator, "is_fsdp2", False):
        raise InputError("FSDP runs need fsdp_version: 2 in the accelerate config (see configs/fsdp.yaml)")
    if fsdp and recipe.model.quantization is not None:
        raise InputError("model.quantization: a quantized base is not sharded by FSDP here; train it on one GPU "
                         "per process with DDP (configs/ddp.yaml), each holding the whole quantized model")
    run = RunFolder(Path(recipe.output.dir))
    dtype = models.resolve_dtype(recipe.model.dtype)
    run_recipe = resolved(recipe)
    cfg = run_recipe.train
    ckpt = find_resume_checkpoint(resume, run.path)  # --resume is checked before any data is read
    hashes = data_hashes(recipe.data)
    if ckpt is not None:
        check_resume_fits(ckpt, run_recipe.model_dump(mode="json"), hashes, reporter)
    trackers.check_installed(recipe.tracking)

    set_seed(cfg.seed)
    reporter.log(f"loading {recipe.model.name_or_path} ({run_recipe.model.dtype})")
    # Straight onto this process's GPU (no full copy in host memory first); FSDP shards from the host.
    device_map = {"": accelerator.device} if accelerator.device.type == "cuda" and not fsdp else None
    model, tokenizer = prepare_model(recipe, dtype=dtype, device_map=device_map)
    check_model(recipe, model, tokenizer)
    dataset = data_lib.build(recipe.data, tokenizer, seed=cfg.seed,
                             attention=model.config._attn_implementation, reporter=reporter)
    check_data(dataset, accelerator.num_processes)
    trainable, total = model.get_nb_trainable_parameters()
    reporter.log(
        f"{len(dataset.train)} training examples, {len(dataset.eval or [])} eval examples; "
        f"trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if ckpt is not None:
        checkpoint.load_adapter(model, ckpt)  # before sharding: FSDP then spreads the loaded weights

    steps = total_steps(cfg, len(dataset.train), accelerator.num_processes)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
    scaler = torch.amp.GradScaler(accelerator.device.type) if dtype == torch.float16 else None
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    if ckpt is not None:
        state = checkpoint.restore(ckpt, model, optimizer, scheduler, scaler, accelerator, fsdp, reporter)
        reporter.log(f"resuming from {ckpt} at step {state.step} of {steps}")
    else:
        state = checkpoint.TrainState(world_size=accelerator.num_processes, data_sha256=hashes)

    recipe_yaml = run_recipe.to_yaml()
    if main:
        if ckpt is not None and run.path.exists():
            removed = run.reopen(recipe_yaml, state.step)
            if removed:
                reporter.log(f"removed the checkpoints after step {state.step}: {', '.join(removed)}")
        else:
            run.create(recipe_yaml)
    sinks: list[Any] = []
    summary: dict[str, Any] = {
        "status": "running",
        "run_dir": str(run.path.resolve()),
        "resumed_from": str(ckpt) if ckpt is not None else None,
        "max_steps": steps,
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(dataset.train),
        "eval_examples": len(dataset.eval or []),
        "data": {k: vars(v) for k, v in dataset.stats.items()},
    }
    last_checkpoint: list[Path | None] = [checkpoint.latest(run.path) if main else None]

    def write_metrics(record: dict[str, Any]) -> None:
        if not main:
            return
        run.write_metrics(record)
        for sink in sinks:
            sink.log(record)

    def save_checkpoint(st) -> None:
        payload = checkpoint.Payload(
            step=st.step,
            adapter=checkpoint.adapter_state(unwrapped) if fsdp else None,
            optimizer=checkpoint.optimizer_state(model, optimizer, fsdp),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            rng=gather_object([checkpoint.rng_state()]) if accelerator.num_processes > 1 else [checkpoint.rng_state()],
            state=st,
        )
        if main:
            last_checkpoint[0] = checkpoint.write(run.path, unwrapped, payload, recipe_yaml, cfg.keep_checkpoints)
            reporter.log(f"checkpoint {last_checkpoint[0].relative_to(run.path)}")
        accelerator.wait_for_everyone()

    def where_to_resume() -> str:
        if last_checkpoint[0] is None:
            return "no checkpoint was written"
        return f"last checkpoint {last_checkpoint[0]}"

    try:
        with StopRequest() as stop:
            if main:
                if recipe.tracking.tensorboard:
                    sinks.append(trackers.TensorBoard(run.path / "tensorboard", state.step))
                    summary["tensorboard"] = str(run.path / "tensorboard")
                if recipe.tracking.mlflow:
                    mlf = trackers.MLflow(recipe.tracking, run.path, recipe.tracking.run_name or run.path.name,
                                          trackers.flat_params(run_recipe.model_dump(mode="json")),
                                          state.trackers.get("mlflow_run_id"))
                    state.trackers["mlflow_run_id"] = mlf.run_id
                    summary["mlflow"] = {"tracking_uri": mlf.uri, "run_id": mlf.run_id}
                    sinks.append(mlf)
            ended = fit(
                model, optimizer, scheduler, scaler, dataset.train, dataset.eval, run_recipe, accelerator,
                tokenizer.pad_token_id, state, steps, write_metrics=write_metrics, checkpoint=save_checkpoint,
                stop_signal=lambda: stop.signum is not None, reporter=reporter,
            )
            if ended == "interrupted":
                summary.update(status="interrupted", stop_reason=stop.name)
                raise Interrupted(stop.signum, f"interrupted by {stop.name} at step {state.step}; "
                                  f"{where_to_resume()}; continue with --resume auto")
            save_final(run.path, unwrapped, tokenizer, state, cfg, fsdp, main, reporter)
            summary.update(status="completed", stop_reason=ended)
    except StopNow as e:
        summary.update(status="interrupted", stop_reason=f"{e} (second signal)")
        raise Interrupted(e.signum, f"stopped at once by a second {e} during step {state.step + 1}; "
                          f"{where_to_resume()}") from None
    except Diverged as e:
        summary.update(status="diverged", error=str(e))
        raise Diverged(e.step, f"{e.what}; {where_to_resume()}") from None
    except PeftctlError as e:
        if summary["status"] == "running":
            summary.update(status="failed", error=str(e))
        raise
    except KeyboardInterrupt:
        summary.update(status="interrupted", stop_reason="KeyboardInterrupt")
        raise
    except Exception as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise RuntimeFailure(f"training failed: {type(e).__name__}: {e}") from e
    finally:
        best_ckpt = checkpoint.step_name(state.best_step) if state.best_step is not None else None
        summary.update(
            steps=state.step,
            epochs=round(state.step * cfg.batch_size * cfg.grad_accum * accelerator.num_processes
                         / len(dataset.train), 4),
            train_loss=state.last_loss,
            final_eval=state.evals[-1] if state.evals else None,
            best_eval=None if state.best_step is None else {
                "eval_loss": state.best_eval_loss, "step": state.best_step,
                "checkpoint": f"{checkpoint.CHECKPOINTS}/{best_ckpt}"
                if (run.path / checkpoint.CHECKPOINTS / best_ckpt).is_dir() else None,
            },
            skipped_steps=state.skipped_steps,
            tokens_seen=state.tokens_seen,
            loss_tokens_seen=state.loss_tokens_seen,
            tokens_per_s=state.tokens_seen / state.train_time_s if state.train_time_s else None,
            train_time_s=state.train_time_s,
            wall_time_s=time.time() - started,
            last_checkpoint=str(last_checkpoint[0].relative_to(run.path)) if last_checkpoint[0] else None,
            peak_memory_bytes=peak_memory_bytes(accelerator.device),
            device=str(accelerator.device),
            num_processes=accelerator.num_processes,
            versions=versions(),
        )
        if main:
            for sink in sinks:
                sink.close(summary)
            run.write_summary(summary)
            if state.step:
                reporter.log(report.terminal_chart(run.path))
                image = report.write_image(run.path)
                if image is not None:
                    reporter.log(f"curves: {image}")
    return summary
