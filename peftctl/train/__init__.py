"""`train(recipe)`: a recipe run end to end, in the order a reader expects.

Everything that can be wrong with the user's input (the output folder, a checkpoint to resume and
whether the recipe still fits it, trackers, tokenizer, data rows, model, adapter targets) is
checked before the run folder is created or touched, so bad input leaves nothing behind; from then
on the folder always ends with a summary.json that says how the run ended: completed, interrupted
(a signal), diverged (NaN/inf, or a collapsed model) or failed. Only the main process writes files
and logs; it holds the folder's lock (`lock.py`) while it does, so two runs never share a folder.
"""

from __future__ import annotations

import functools
import json
import platform
import re
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftctl.errors import InputError, PeftctlError, RuntimeFailure
from peftctl.fsio import atomic_write_text, check_output_dir, disk_full_reason
from peftctl.train.lock import LOCK_NAME, RunLock
from peftctl.ui import Reporter

# A temporary name of fsio's atomic writes and of checkpoint folders: `.NAME.XXXX.tmp` (or `.old`).
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)$")
# What a run writes besides the adapter and tokenizer files (removed when a run starts again).
_ATTEMPT_FILES = ("metrics.jsonl", "summary.json", "curves.png", "tensorboard", "reference_logps.safetensors")
REFERENCE_FILE = "reference_logps.safetensors"  # train.precompute_ref_log_probs: (N, 2) per split


def _entries(path: Path) -> list[Path]:
    """What a folder holds, but the run lock (which outlives the runs that held it)."""
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def refuse_in_use(path: Path) -> None:
    """Refuse a folder whose lock another process holds (a run in progress: its files are not final)."""
    holder = RunLock.holder(path)
    if holder is not None:
        raise InputError(f"output.dir {path} is in use by another peftctl train (pid {holder}); "
                         "wait for it to end, or stop it, before starting another run there")


def _refuse_used(path: Path, hint: str) -> None:
    """Refuse a folder that holds anything: nothing the user had is overwritten."""
    if path.exists() and not path.is_dir():
        raise InputError(f"output.dir {path} exists and is not a folder")
    if _entries(path):
        refuse_in_use(path)
        raise InputError(f"output.dir {path} is not empty; {hint}")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when there is none (or it cannot be read: unknown)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def restartable(run_dir: Path) -> bool:
    """Whether `--resume auto` starts the run in `run_dir` again from the beginning: the folder
    holds only temporaries, or a run that wrote no complete checkpoint and did not complete (killed
    before its first checkpoint, or failed or diverged before it)."""
    from peftctl.train import checkpoint

    names = {p.name for p in _entries(run_dir) if not _TEMPORARY.match(p.name)}
    if not names:
        return True
    if "recipe.yaml" not in names or checkpoint.latest(run_dir) is not None:
        return False
    return (read_summary(run_dir) or {}).get("status") != "completed"


class RunFolder:
    """The run folder's own files: recipe.yaml, metrics.jsonl, summary.json."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = RunLock(path)

    def create(self, recipe_yaml: str, restart: bool = False) -> list[str]:
        """Start the run here: a new or empty folder, or (`restart`) one whose earlier attempt left no
        checkpoint, whose files and temporaries are then removed (returned)."""
        hint = "choose another or remove it"
        if not restart:
            _refuse_used(self.path, hint)  # again: something may have appeared while we loaded
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        removed = []
        if restart:
            if not restartable(self.path):
                raise InputError(f"output.dir {self.path} changed while the model loaded; {hint}")
            removed = self._clear_attempt()
        elif _entries(self.path):
            raise InputError(f"output.dir {self.path} is not empty; {hint}")
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
        atomic_write_text(self.path / "metrics.jsonl", "")
        return removed

    def _clear_attempt(self) -> list[str]:
        from peftctl.train import checkpoint

        removed = []
        for p in sorted(self.path.iterdir()):
            if p.name in _ATTEMPT_FILES or p.name == checkpoint.CHECKPOINTS or _TEMPORARY.match(p.name):
                removed.append(p.name)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return removed

    def reopen(self, recipe_yaml: str, step: int) -> list[str]:
        """Continue a run from its checkpoint at `step`: drop what was written after it (metrics
        lines, later checkpoints). Returns the names of the checkpoints removed."""
        from peftctl.runs import read_metrics
        from peftctl.train import checkpoint

        self.lock.acquire()
        metrics = self.path / "metrics.jsonl"
        # Every line checked before anything changes (a line that is not a metrics record is exit 2
        # naming the file and line); the half line a kill left behind is dropped.
        kept = [r for r in read_metrics(self.path) if r["step"] <= step] if metrics.exists() else []
        removed = checkpoint.clear_after(self.path, step)
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
        return removed

    def write_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2, default=str) + "\n"
        try:
            atomic_write_text(self.path / "summary.json", text)
        except OSError as e:
            if disk_full_reason(e) is None or not self.lock.held:
                raise
            self.lock.free_reserve()  # the disk is full: the space held for this moment
            atomic_write_text(self.path / "summary.json", text)


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    from peftctl.constants import VERSION

    return {
        "peftctl": VERSION,
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
    from peftctl.sections import TASK_TYPES

    model, tokenizer = models.load(recipe.model, dtype=dtype, device_map=device_map)
    base_vocab = io.vocabulary_rows(model)  # before anything resizes the embeddings
    config = recipe.adapter.model_copy(update={
        "base_model_name_or_path": models.base_model_reference(recipe.model),
        "task_type": TaskType(TASK_TYPES[recipe.model.task_name]).value,  # PEFT's name for model.task
    })
    from peftctl.adapters.prompt import init_tokenizer

    try:
        with init_tokenizer(tokenizer):  # prompt_tuning_init: TEXT reads its text with the run's tokenizer
            peft_model = attach(model, config)
    except (ValueError, TypeError) as e:
        raise InputError(f"adapter: {(str(e).splitlines() or [''])[0]}") from None  # torch adds C++ frames
    # Saving compares the vocabulary with this: embeddings resized for new tokens are saved too.
    peft_model.base_model.base_vocab_size = base_vocab
    return peft_model, tokenizer


def with_labels(recipe):
    """The recipe with `model.labels` for seq_cls and token_cls: the recipe's own, else the training
    data's label names, sorted (`data.tasks.label_names`; a bad row is an input error naming it). The
    run writes them in its recipe.yaml, so that evaluating, merging and exporting it load the same head."""
    from peftctl.sections import LABELLED_TASKS

    task = recipe.model.task_name
    if task not in LABELLED_TASKS or recipe.model.labels:
        return recipe
    from peftctl.data.tasks import label_names

    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"labels": label_names(task, recipe.data)})})


def resolved(recipe):
    """The recipe as it runs: `auto` dtypes replaced by the dtype this machine gives them, and
    `train.gradient_checkpointing` decided (unset: on for a quantized base)."""
    from peftctl import models

    dtype = str(models.resolve_dtype(recipe.model.dtype)).removeprefix("torch.")
    model = {"dtype": dtype}
    q = recipe.model.quantization
    if q is not None and q.bits == 4 and q.compute_dtype == "auto":
        model["quantization"] = q.model_copy(update={"compute_dtype": dtype})
    # With a memory budget, checkpointing is decided at run time (train.budget): left unset.
    checkpointing = None if recipe.train.memory_budget is not None else recipe.uses_gradient_checkpointing()
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
    """The checkpoint to continue from (None: start fresh, or again), or an input error saying why not.

    With `--resume auto`, a folder whose run wrote no complete checkpoint starts again from the
    beginning (`restartable`), so that a job which always passes it survives a kill at any moment.
    """
    from peftctl.train import checkpoint

    check_output_dir(run_dir, "output.dir")
    if resume is None:
        _refuse_used(run_dir, "resume it with --resume auto, choose another (--set output.dir=...) or remove it")
        return None
    if resume == "auto":
        found = checkpoint.latest(run_dir)
        if found is not None or restartable(run_dir):
            return found
        _refuse_used(run_dir, "it holds no checkpoint to resume from; choose another output.dir or remove it")
    ckpt = Path(resume)
    if checkpoint.state_file(ckpt) is None:
        raise InputError(f"--resume {resume}: not a checkpoint folder (no {checkpoint.STATE_FILE}); "
                         f"checkpoints are RUN_DIR/{checkpoint.CHECKPOINTS}/step-NNNNNN")
    if ckpt.resolve().parent.parent != run_dir.resolve():
        _refuse_used(run_dir, "a checkpoint of another run continues into a new folder")
    return ckpt


def check_resume_fits(ckpt: Path, recipe_dump: dict, hashes: dict[str, str]) -> list[str]:
    """Refuse (input error) a recipe that makes the checkpoint another run; return the other changes."""
    from peftctl.train import checkpoint

    state, saved = checkpoint.check(ckpt)  # every file it holds, before anything loads
    refusals, notes = checkpoint.compare(saved, recipe_dump, state.data_sha256, hashes)
    if refusals:
        raise InputError(f"cannot resume from {ckpt}: the recipe changed in ways that make it another run:\n"
                         + "\n".join(f"  {r}" for r in refusals))
    return notes


def finished_run(resume: str | None, run_dir: Path, cfg, ckpt: Path | None) -> str | None:
    """Why the run in `run_dir` trains nothing more, or None.

    A run that completed (early stopping included) is finished unless the recipe asks for more than
    it did: a larger `train.max_steps` or `train.epochs`, or, after early stopping, a patience that
    its evaluations no longer exhaust. Going back to an older checkpoint (`--resume PATH`) is always
    allowed.
    """
    from peftctl.train import checkpoint
    from peftctl.train.loop import target_examples

    summary = read_summary(run_dir) if resume is not None else None
    if summary is None or summary.get("status") != "completed":
        return None
    if resume != "auto" and (ckpt is None or ckpt.resolve() != (checkpoint.latest(run_dir) or ckpt).resolve()):
        return None
    steps, n = int(summary.get("steps") or 0), int(summary.get("train_examples") or 1)
    if summary.get("stop_reason") == "early_stopping" and cfg.early_stopping_patience is not None:
        since = checkpoint.read_state(ckpt).evals_since_best if ckpt is not None else None
        if since is None or since >= cfg.early_stopping_patience:
            return (f"it stopped early at step {steps}: {cfg.best_metric} had not improved for "
                    f"{cfg.early_stopping_patience} evaluations")
    done = summary.get("examples_seen")
    if done is None:  # a summary written before examples were counted
        done = round(float(summary.get("epochs") or 0) * n)
    if cfg.max_steps is not None and cfg.max_steps > steps:
        return None
    if cfg.max_steps is None and target_examples(cfg, n) > done:
        return None
    return f"it completed {steps} steps ({done / n:.4g} epochs)"


def resume_command(recipe, num_processes: int = 1) -> str:
    """The command that continues this run: the recipe file and its --set flags as given (from where
    the recipe says its values came), `--resume auto`; quoted for a POSIX shell."""
    import shlex

    source, _, overridden = recipe._origin or ("RECIPE", {}, {})
    args = ["peftctl", "train", source]
    for flag in dict.fromkeys(overridden.values()):
        args += ["--set", flag]
    if num_processes > 1:
        args += ["--num-processes", str(num_processes)]
    return shlex.join([*args, "--resume", "auto"])


def resume_point(resume: str | None, run_dir: Path, run_recipe, hashes: Callable[[], dict[str, str]]):
    """(checkpoint to continue from or None, recipe changes allowed, why the run is finished or None).

    Reads files only: an input error if the folder or checkpoint cannot be used. `hashes` gives the
    data's digests (`data_hashes`), called only when there is a checkpoint to compare them with."""
    from peftctl.train import checkpoint

    if resume == "auto" and checkpoint.latest(run_dir) is None and \
            (read_summary(run_dir) or {}).get("status") == "completed":
        finished = finished_run(resume, run_dir, run_recipe.train, None)
        if finished is None:
            raise InputError(f"output.dir {run_dir}: the run completed without checkpoints (train.save_every "
                             "unset), so it cannot train on; start a new run in another output.dir")
        return None, [], finished
    ckpt = find_resume_checkpoint(resume, run_dir)
    notes = check_resume_fits(ckpt, run_recipe.model_dump(mode="json"), hashes()) if ckpt is not None else []
    return ckpt, notes, finished_run(resume, run_dir, run_recipe.train, ckpt)


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


def packed_attention(peft_model, cfg, device) -> str:
    """The attention name packed batches are laid out for (`data.packing.layout_for`): the fused
    forward's own variable-length attention where it runs, else the model's implementation."""
    from peftctl.train import budget

    attention = peft_model.config._attn_implementation
    if budget.kernels_on(cfg.kernels, device):
        from peftctl.adapters.lora.fused import varlen_supported
        from peftctl.data.packing import FUSED_VARLEN

        if varlen_supported(peft_model.get_base_model(), device):
            return FUSED_VARLEN
    return attention


def speed_settings(peft_model, cfg, examples, device, reporter: Reporter) -> dict[str, Any]:
    """Fused kernels (train.kernels) and checkpointing (train.memory_budget, else
    train.gradient_checkpointing) applied to the model; returns what was chosen, for summary.json."""
    from peftctl.train import budget

    out: dict[str, Any] = {"kernels": None, "memory_plan": None}
    if budget.kernels_on(cfg.kernels, device):
        from peftctl.adapters.lora.fused import enable_fused

        out["kernels"] = enable_fused(peft_model)
    config = peft_model.get_base_model().config
    chosen = budget.plan(peft_model, config, cfg, budget.workload(examples, cfg.batch_size, pairs=cfg.objective != "sft"), device) \
        if cfg.memory_budget is not None else None
    if chosen is not None:
        budget.apply(peft_model, chosen["checkpoint_layers"], chosen["offload"], device)
        reporter.log(budget.describe(chosen))
        out["memory_plan"] = chosen
    elif cfg.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    return out


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
    else:
        peft_model.save_adapter("default", run_dir, tensors=tensors)
    tokenizer.save_pretrained(run_dir)


def reference_logps(recipe, model, dataset, pad_id: int, run_dir: Path | None, accelerator,
                    reporter: Reporter, kernels: Any = None) -> dict[str, Any] | None:
    """The precomputed reference log-probabilities of a dpo / ipo run with
    `train.precompute_ref_log_probs`: read back from the run folder (a resumed run), else from the
    data cache or computed now (`train.reference`), on the model as the run starts (its adapter
    disabled, or the `train.init_adapter` one enabled), before any checkpoint's weights are
    loaded. None when the run needs none."""
    import torch

    from peftctl.preference import Objective
    from peftctl.train import reference
    from peftctl.userfiles import load_safetensors

    cfg = recipe.train
    if not (Objective.of(cfg).needs_reference and cfg.precompute_ref_log_probs):
        return None
    splits = {"train": dataset.train} | ({"eval": dataset.eval} if dataset.eval else {})
    saved = run_dir / REFERENCE_FILE if run_dir is not None else None
    if saved is not None and saved.is_file():
        tensors = load_safetensors(saved)
        for name, examples in splits.items():
            got = tensors.get(name)
            if got is None or tuple(got.shape) != (len(examples), 2) or got.dtype != torch.float32:
                raise InputError(f"{saved}: holds no {name} reference log-probabilities for these {len(examples)} "
                                 "pairs; remove it to compute them again")
        reporter.log(f"reference log-probabilities from {saved}")
        return {name: tensors[name].contiguous() for name in splits} | {"saved": True}
    return reference.reference_logps(recipe, model, splits, pad_id, accelerator, reporter, kernels)


def _on_main(accelerator, fn) -> None:
    """Run `fn` on the main process only; its failure is raised on every process (as an input
    error where it was one), so that no process waits for the others in a collective."""
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [None if error is None else (isinstance(error, InputError), str(error))]
        broadcast_object_list(box, from_process=0)
        if box[0] is not None and error is None:
            is_input, message = box[0]
            raise (InputError if is_input else RuntimeFailure)(message)
    if error is not None:
        raise error


def best_record(state) -> dict[str, Any]:
    """The evaluation record of the best step (its eval_loss and metrics)."""
    found = [r for r in state.evals if r.get("step") == state.best_step]
    return found[-1] if found else {"eval_loss": state.best_eval_loss}


def already_finished(run_dir: Path, why: str, reporter: Reporter) -> dict[str, Any]:
    """A finished run started again: nothing is trained or written; its summary, with `nothing_trained`."""
    reporter.log(f"{run_dir}: the run has already finished ({why}); nothing to train. To train on, "
                 "resume it with a larger train.max_steps or train.epochs"
                 + (" or early_stopping_patience" if "stopped early" in why else "") + ".")
    return {**(read_summary(run_dir) or {}), "nothing_trained": why}


def train(recipe, reporter: Reporter | None = None, resume: str | None = None) -> dict[str, Any]:
    """Run a recipe: load, attach, read data, train, save. Returns the summary.

    `resume`: None (a new run: output.dir must be new or empty), "auto" (the latest checkpoint in
    output.dir; a new run when there is none; the run again from the beginning when its folder holds
    no complete checkpoint; nothing when the run has finished), or a checkpoint folder.
    """
    run = RunFolder(Path(recipe.output.dir))
    try:
        return _train(recipe, reporter, resume, run)
    finally:
        run.lock.release()


def _train(recipe, reporter: Reporter | None, resume: str | None, run: RunFolder) -> dict[str, Any]:
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
    dtype = models.resolve_dtype(recipe.model.dtype)
    recipe = with_labels(recipe)  # seq_cls / token_cls: the head's labels, before anything else is decided
    run_recipe = resolved(recipe)
    cfg = run_recipe.train
    # Before anything is read: a run in progress has not said how it ends. Checked by the main process
    # only, before it takes the lock itself (another rank would see this run's own lock).
    _on_main(accelerator, lambda: refuse_in_use(run.path))
    # --resume is checked before any data is read (the data's digests only when a checkpoint needs them)
    hashes = functools.cache(lambda: data_hashes(recipe.data))
    ckpt, notes, finished = resume_point(resume, run.path, run_recipe, hashes)
    if finished is not None:
        return already_finished(run.path, finished, reporter)
    hashes()  # the data files found and read (digested) before the model loads
    if _entries(run.path):
        # A run continues (or starts again) here: the folder is locked before it is read again for
        # good, so that two processes never pick the same checkpoint and write the same files.
        _on_main(accelerator, run.lock.acquire)
        ckpt, notes, finished = resume_point(resume, run.path, run_recipe, hashes)
    if finished is not None:
        return already_finished(run.path, finished, reporter)
    if notes:
        reporter.log(f"resuming from {ckpt.name} with recipe changes: " + "; ".join(notes))
    restart = ckpt is None and resume == "auto" and bool(_entries(run.path))
    trackers.check_installed(recipe.tracking)

    set_seed(cfg.seed)
    reporter.log(f"loading {recipe.model.name_or_path} ({run_recipe.model.dtype})")
    # Straight onto this process's GPU (no full copy in host memory first); FSDP shards from the host.
    device_map = {"": accelerator.device} if accelerator.device.type == "cuda" and not fsdp else None
    model, tokenizer = prepare_model(recipe, dtype=dtype, device_map=device_map)
    check_model(recipe, model, tokenizer)
    dataset = data_lib.build(recipe.data, tokenizer, seed=cfg.seed,
                             attention=packed_attention(model, cfg, accelerator.device), reporter=reporter,
                             task=recipe.model.task_name, labels=recipe.model.labels)
    check_data(dataset, accelerator.num_processes)
    trainable, total = model.get_nb_trainable_parameters()
    reporter.log(
        f"{len(dataset.train)} training examples, {len(dataset.eval or [])} eval examples; "
        f"trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )
    speed = speed_settings(model, cfg, dataset.train, accelerator.device, reporter)
    if cfg.init_adapter is not None:
        checkpoint.load_adapter(model, Path(cfg.init_adapter), "train.init_adapter")
        if ckpt is None:  # a resumed run continues from its checkpoint's weights (loaded below)
            reporter.log(f"starting from the adapter in {cfg.init_adapter}")
    # Before a checkpoint's weights load: the reference is the model as the run starts.
    from peftctl.preference import Objective

    ref_meta = None  # what the saved reference was computed on (peftctl eval reads it)
    if cfg.precompute_ref_log_probs and Objective.of(cfg).needs_reference and main:
        from peftctl.train import reference

        ref_meta = reference.run_metadata(recipe, model, {"train": dataset.train} | (
            {"eval": dataset.eval} if dataset.eval else {}))
    ref_logps = reference_logps(run_recipe, model, dataset, tokenizer.pad_token_id, run.path if ckpt else None,
                                accelerator, reporter, speed.get("kernels"))
    if ckpt is not None:
        checkpoint.load_adapter(model, ckpt)  # before sharding: FSDP then spreads the loaded weights

    # Finished steps count as they were made; the rest at this recipe's batch geometry.
    done = checkpoint.read_state(ckpt) if ckpt is not None else checkpoint.TrainState()
    steps = total_steps(cfg, len(dataset.train), accelerator.num_processes, done.step, done.epoch, done.position)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
    scaler = torch.amp.GradScaler(accelerator.device.type) if dtype == torch.float16 else None
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    hooks = unwrapped.training_hooks()  # what the adapter method adds to training (often nothing)
    if hooks:
        try:
            hooks.begin(steps)
        except ValueError as e:
            raise InputError(f"adapter: {e}") from None

    if ckpt is not None:
        state = checkpoint.restore(ckpt, model, optimizer, scheduler, scaler, accelerator, fsdp, reporter, hooks)
        reporter.log(f"resuming from {ckpt} at step {state.step} of {steps}")
    else:
        state = checkpoint.TrainState(world_size=accelerator.num_processes, data_sha256=hashes())

    recipe_yaml = run_recipe.to_yaml()

    def open_folder() -> None:
        if ckpt is not None and ckpt.resolve().parent.parent == run.path.resolve():
            removed = run.reopen(recipe_yaml, state.step)
            if removed:
                reporter.log(f"removed the checkpoints after step {state.step}: {', '.join(removed)}")
        else:
            removed = run.create(recipe_yaml, restart=restart)
            if restart:
                reporter.log(f"{run.path} held no complete checkpoint: starting the run again from the beginning"
                             + (f" (removed {', '.join(removed)})" if removed else ""))

    _on_main(accelerator, open_folder)
    if ref_logps is not None and not ref_logps.pop("saved", False):
        from safetensors.torch import save as st_save

        from peftctl.fsio import atomic_write_bytes

        _on_main(accelerator, lambda: atomic_write_bytes(run.path / REFERENCE_FILE,
                                                         st_save(ref_logps, metadata=ref_meta)))
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
        **speed,
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
            hooks=hooks.state_dict() if hooks else None,
        )
        if main:
            last_checkpoint[0] = checkpoint.write(run.path, unwrapped, payload, recipe_yaml, cfg.keep_checkpoints)
            reporter.log(f"checkpoint {last_checkpoint[0].relative_to(run.path)}")
        accelerator.wait_for_everyone()

    def where_to_resume(before: int | None = None) -> str:
        if before is not None:  # the checkpoints written since step `before` hold the collapsed model
            good = [p for s, p in checkpoint.checkpoint_dirs(run.path) if s < before] if main else []
            return f"last checkpoint before the collapse {good[-1]}" if good else \
                "no checkpoint from before the collapse is left"
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
                if recipe.tracking.wandb:
                    wb = trackers.WandB(recipe.tracking, run.path, recipe.tracking.run_name or run.path.name,
                                        trackers.flat_params(run_recipe.model_dump(mode="json")),
                                        state.trackers.get("wandb_run_id"))
                    state.trackers["wandb_run_id"] = wb.run_id
                    summary["wandb"] = {"mode": wb.mode, "run_id": wb.run_id, "dir": wb.dir}
                    if wb.why_offline:
                        reporter.log(f"wandb: offline ({wb.why_offline}); upload later with: wandb sync {wb.dir}")
                    sinks.append(wb)
            ended = fit(
                model, optimizer, scheduler, scaler, dataset.train, dataset.eval, run_recipe, accelerator,
                tokenizer.pad_token_id, state, steps, write_metrics=write_metrics, checkpoint=save_checkpoint,
                stop_signal=lambda: stop.signum is not None, reporter=reporter, hooks=hooks, ref_logps=ref_logps,
                eval_tokenizer={"tokenizer": tokenizer, "id2label": dict(enumerate(recipe.model.labels or []))},
            )
            if ended == "interrupted":
                summary.update(status="interrupted", stop_reason=stop.name)
                raise Interrupted(stop.signum, f"interrupted by {stop.name} at step {state.step}; "
                                  f"{where_to_resume()}; continue with: "
                                  f"{resume_command(recipe, accelerator.num_processes)}")
            if hooks:
                hooks.end()  # after the last step, before the run's adapter is saved
            save_final(run.path, unwrapped, tokenizer, state, cfg, fsdp, main, reporter)
            summary.update(status="completed", stop_reason=ended)
    except StopNow as e:
        summary.update(status="interrupted", stop_reason=f"{e} (second signal)")
        raise Interrupted(e.signum, f"stopped at once by a second {e} during step {state.step + 1}; "
                          f"{where_to_resume()}; continue with: "
                          f"{resume_command(recipe, accelerator.num_processes)}") from None
    except Diverged as e:
        summary.update(status="diverged", stop_reason=e.reason, error=str(e))
        # A collapse first seen at step `since` was made by the update of the step before: the
        # checkpoints from that step on hold the collapsed model.
        before = e.since - 1 if e.since is not None else None
        raise Diverged(e.step, f"{e.what}; {where_to_resume(before)}", e.reason, e.since) from None
    except PeftctlError as e:
        if summary["status"] == "running":
            summary.update(status="failed", error=str(e))
        raise
    except KeyboardInterrupt:
        summary.update(status="interrupted", stop_reason="KeyboardInterrupt")
        raise
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            summary.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise RuntimeFailure(f"training failed: {type(e).__name__}: {e}") from e
        message = (f"training failed after step {state.step}: {reason} (writing into {run.path}); "
                   f"{where_to_resume()}; make room and continue with --resume auto")
        summary.update(status="failed", error=message)
        raise RuntimeFailure(message) from None
    finally:
        best_ckpt = checkpoint.step_name(state.best_step) if state.best_step is not None else None
        examples_seen = state.epoch * len(dataset.train) + state.position
        summary.update(
            steps=state.step,
            epochs=examples_seen / len(dataset.train),  # exact: every example counts once per pass
            examples_seen=examples_seen,
            train_loss=state.last_loss,
            # The evaluation of the run's adapter: the best one's when load_best_at_end put it there.
            final_eval=(best_record(state) if cfg.load_best_at_end and state.best_step is not None
                        else state.evals[-1] if state.evals else None),
            best_eval=None if state.best_step is None else {
                **{k: v for k, v in best_record(state).items() if k != "step"},
                "metric": cfg.best_metric, "step": state.best_step,
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
            # Whatever fails here (a full disk) is said, and does not hide how the run ended.
            for sink in sinks:
                try:
                    sink.close(summary)
                except Exception as e:
                    reporter.log(f"could not close {type(sink).__name__}: {disk_full_reason(e) or e}")
            try:
                run.write_summary(summary)
            except OSError as e:
                reporter.log(f"could not write {run.path / 'summary.json'}: {disk_full_reason(e) or e}")
            if state.step:
                try:
                    reporter.log(report.terminal_chart(run.path))
                    image = report.write_image(run.path)
                    if image is not None:
                        reporter.log(f"curves: {image}")
                except OSError as e:
                    reporter.log(f"could not draw the curves: {disk_full_reason(e) or e}")
    return summary
