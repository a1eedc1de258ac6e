"""`peftctl merge`: fold a run's adapter into its base model and save a plain transformers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.fsio import atomic_dir, refuse_nonempty
from peftctl.ui import Reporter


def _probe_ids(tokenizer, device):
    import torch

    text = "The quick brown fox jumps over the lazy dog. 1, 2, 3."
    return torch.tensor([tokenizer(text)["input_ids"][:32]], device=device)


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
              reporter: Reporter | None = None) -> dict[str, Any]:
    """Merge the adapter of `run_dir` into its base; write `out_dir` (which must not hold anything).

    The merged model's logits are compared with the adapter model's on a probe sentence, and the
    largest difference is reported.
    """
    import torch

    from peftctl import models, runs

    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    refuse_nonempty(out_dir)
    run = runs.read_run(run_dir)
    spec = run.model_section
    load_dtype = models.resolve_dtype(spec.dtype)
    reporter.log(f"loading {spec.name_or_path} and the adapter from {run_dir}")
    model, tokenizer = runs.load_adapter_model(run, dtype=load_dtype)
    model.eval()
    device = next(model.parameters()).device
    probe = _probe_ids(tokenizer, device)
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()
        merged = model.merge_and_unload(safe_merge=True)
        after = merged(input_ids=probe).logits.float()
    diff = float((before - after).abs().max())
    out_dtype = models.resolve_dtype(dtype) if dtype else load_dtype
    merged = merged.to(out_dtype)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    reporter.log(f"merged model written to {out_dir}")
    return {
        "output": str(out_dir),
        "base_model": spec.name_or_path,
        "dtype": str(out_dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in merged.parameters()),
        "max_logit_diff": diff,
    }
