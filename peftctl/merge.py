"""`peftctl merge`: fold one run's adapter, or a weighted combination of several runs' adapters,
into the base model and save a plain transformers folder; or save the combined adapter itself
(`adapter_only`), optionally at another rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.errors import InputError
from peftctl.fsio import atomic_dir, refuse_nonempty
from peftctl.ui import Reporter

COMBINED = "combined"


def _probe_ids(tokenizer, device):
    import torch

    text = "The quick brown fox jumps over the lazy dog. 1, 2, 3."
    return torch.tensor([tokenizer(text)["input_ids"][:32]], device=device)


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
              reporter: Reporter | None = None) -> dict[str, Any]:
    """Merge the adapter of `run_dir` into its base; write `out_dir` (which must not hold anything)."""
    return merge_runs([run_dir], out_dir, dtype=dtype, reporter=reporter)


def _check_options(n: int, weights, combination_type, rank, adapter_only) -> tuple[list[float], str]:
    from peftctl.adapters.lora.combine import COMBINATION_TYPES

    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise InputError(f"--weights has {len(weights)} values for {n} adapters")
    combination_type = combination_type or "cat"
    if combination_type not in COMBINATION_TYPES:
        raise InputError(f"--combination must be one of {', '.join(COMBINATION_TYPES)}, got {combination_type!r}")
    if rank is not None and not adapter_only:
        raise InputError("--rank resizes an adapter: use it with --adapter-only")
    return weights, combination_type


def _load_adapters(runs_: list, dtype, reporter: Reporter):
    """The base model with every run's adapter loaded (names a0, a1, ...), and the first tokenizer."""
    from peftctl import models, runs
    from peftctl.adapters import PeftModel

    spec = runs_[0].model_section
    for run in runs_[1:]:
        if run.model_section.name_or_path != spec.name_or_path:
            raise InputError(
                f"{run.path} was trained on {run.model_section.name_or_path}, {runs_[0].path} on "
                f"{spec.name_or_path}: adapters on different base models cannot be merged"
            )
    reporter.log(f"loading {spec.name_or_path} and {len(runs_)} adapter(s)")
    base = models.load_model(spec, dtype=dtype)
    names = [f"a{i}" for i in range(len(runs_))]
    try:
        model = PeftModel.from_pretrained(base, runs_[0].path, adapter_name=names[0])
        for name, run in zip(names[1:], runs_[1:], strict=True):
            model.load_adapter(run.path, adapter_name=name)
    except (ValueError, TypeError) as e:
        raise InputError(str(e)) from None
    return model, names, runs.load_tokenizer(runs_[0])


def merge_runs(run_dirs: list[str | Path], out_dir: str | Path, *, weights: list[float] | None = None,
               combination_type: str | None = None, density: float | None = None, svd_rank: int | None = None,
               adapter_only: bool = False, rank: int | None = None, dtype: str | None = None,
               reporter: Reporter | None = None) -> dict[str, Any]:
    """Combine the runs' adapters (`add_weighted_adapter`; one run: itself) and write `out_dir`.

    A merged model's logits are compared with the adapter model's on a probe sentence, and the
    largest difference is reported.
    """
    import torch

    from peftctl import models, runs

    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    refuse_nonempty(out_dir)
    weights, combination_type = _check_options(len(run_dirs), weights, combination_type, rank, adapter_only)
    runs_ = [runs.read_run(d) for d in run_dirs]
    load_dtype = models.resolve_dtype(runs_[0].model_section.dtype)
    model, names, tokenizer = _load_adapters(runs_, load_dtype, reporter)
    model.eval()
    single = len(names) == 1 and weights == [1.0]
    name = names[0] if single else COMBINED
    if not single:
        try:
            model.add_weighted_adapter(names, weights, COMBINED, combination_type=combination_type,
                                       density=density, svd_rank=svd_rank)
        except ValueError as e:
            raise InputError(str(e)) from None
        model.set_adapter(COMBINED, inference_mode=True)
        for source in names:
            model.delete_adapter(source)
    result: dict[str, Any] = {
        "output": str(out_dir),
        "base_model": runs_[0].model_section.name_or_path,
        "adapters": [str(d) for d in run_dirs],
        "weights": weights,
        "combination_type": None if single else combination_type,
    }
    if rank is not None:
        try:
            report = model.resize_adapter_rank(name, rank)
        except ValueError as e:
            raise InputError(str(e)) from None
        result["resize"] = {"r": rank, "max_relative_error": report["max_relative_error"]}
        reporter.log(f"rank {rank}: largest relative error {report['max_relative_error']:.3g}")
    if adapter_only:
        with atomic_dir(out_dir) as tmp:
            model.save_adapter(name, tmp)
            tokenizer.save_pretrained(tmp)
        reporter.log(f"adapter written to {out_dir}")
        config = model.peft_config[name]
        return {**result, "mode": "adapter", "r": config.r, "lora_alpha": config.lora_alpha}

    device = next(model.parameters()).device
    probe = _probe_ids(tokenizer, device)
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()
        merged = model.merge_and_unload(safe_merge=True)
        after = merged(input_ids=probe).logits.float()
    out_dtype = models.resolve_dtype(dtype) if dtype else load_dtype
    merged = merged.to(out_dtype)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    reporter.log(f"merged model written to {out_dir}")
    return {
        **result,
        "mode": "model",
        "dtype": str(out_dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in merged.parameters()),
        "max_logit_diff": float((before - after).abs().max()),
    }
