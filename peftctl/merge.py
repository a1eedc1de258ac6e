"""`peftctl merge`: fold one run's adapter, or a weighted combination of several runs' adapters,
into the base model and save a plain transformers folder; or save the combined adapter itself
(`adapter_only`), optionally at another rank.

An adapter trained on a quantized base (`model.quantization`) is merged into the base loaded in
its original precision, never into the 4-bit or 8-bit weights (that is refused: rounding the
merged weights back would erase most of the update). The merged model's outputs are then compared
with those of the model as it was trained (quantized base plus adapter) on a few probe texts, and
`quantize` re-quantizes the merged model for deployment.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from peftctl.errors import InputError
from peftctl.fsio import atomic_dir, refuse_nonempty, scratch_dir
from peftctl.ui import Reporter

COMBINED = "combined"
DEFAULT_SHARD_SIZE = "5GB"
QUANTIZE = {"nf4": {"bits": 4, "quant_type": "nf4"}, "fp4": {"bits": 4, "quant_type": "fp4"}, "int8": {"bits": 8}}

# A few inputs of different kinds: prose, a chat turn, numbers and code.
PROBES = (
    "The quick brown fox jumps over the lazy dog. 1, 2, 3.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; 2 of them walked on it.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
)


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
              reporter: Reporter | None = None, **options) -> dict[str, Any]:
    """Merge the adapter of `run_dir` into its base; write `out_dir` (which must not hold anything)."""
    return merge_runs([run_dir], out_dir, dtype=dtype, reporter=reporter, **options)


def _check_options(n: int, weights, combination_type, rank, adapter_only, quantize, *, density=None,
                   svd_rank=None, max_shard_size=None) -> tuple[list[float], str]:
    """Every option checked before any work: a bad or ineffective one is an input error naming the flag."""
    import math

    from peftctl.adapters.lora.config import SVD_TYPES

    combines = n > 1 or (weights is not None and list(weights) != [1.0])
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise InputError(f"--weights has {len(weights)} values for {n} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"--weights must be finite numbers, got {','.join(map(str, weights))}")
    if combination_type is not None and n == 1:
        raise InputError("--combination combines several adapters; one was given")
    combination_type = combination_type or "cat"  # for the checks here; the method's default is used (_combination_for)
    known = _combination_types()
    if combination_type not in known:
        raise InputError(f"--combination must be one of {', '.join(known)}, got {combination_type!r}")
    uses_density = combination_type not in ("linear", "cat", "svd")
    if density is not None and not (combines and uses_density):
        raise InputError("--density applies to combining several adapters with ties, dare_linear, dare_ties, "
                         f"magnitude_prune or their _svd forms (this is {combination_type})")
    if density is not None and not 0 <= density <= 1:
        raise InputError(f"--density must be a fraction between 0 and 1, got {density}")
    if density is None and combines and uses_density:
        raise InputError(f"--combination {combination_type} needs --density (the fraction of each delta kept)")
    if svd_rank is not None and not (combines and combination_type in SVD_TYPES):
        raise InputError(f"--svd-rank applies to the svd combinations ({', '.join(SVD_TYPES)}), "
                         f"not {combination_type}")
    if svd_rank is not None and svd_rank < 1:
        raise InputError(f"--svd-rank must be >= 1, got {svd_rank}")
    if rank is not None and not adapter_only:
        raise InputError("--rank resizes an adapter: use it with --adapter-only")
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be >= 1, got {rank}")
    if quantize is not None and quantize not in QUANTIZE:
        raise InputError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize is not None and adapter_only:
        raise InputError("--quantize quantizes a merged model: it does not go with --adapter-only")
    if max_shard_size is not None and adapter_only:
        raise InputError("--max-shard-size applies to a merged model, not with --adapter-only")
    if max_shard_size is not None:
        shard_bytes(max_shard_size)
    return weights, combination_type


def _combination_types() -> list[str]:
    """Every method's combination types (LoRA's first, in its order)."""
    from peftctl.adapters.registry import config_classes

    out: list[str] = []
    for cls in config_classes():
        out += [t for t in cls.combination_types if t not in out]
    return out


def _combination_for(runs_: list, weights: list[float], given: str | None) -> str | None:
    """The combination type for the runs' adapters (None: nothing is combined): `given` (--combination)
    or their method's default; an input error when they are of different methods, or their method
    does not combine that way (or at all)."""
    from peftctl.adapters.registry import config_from_peft_dict

    classes = {type(config_from_peft_dict(r.adapter_config)) for r in runs_}
    if len(classes) > 1:
        kinds = ", ".join(sorted(c.peft_type for c in classes))
        raise InputError(f"the adapters are of different methods ({kinds}): they cannot be merged together")
    cls = classes.pop()
    if len(runs_) == 1 and weights == [1.0]:
        return None
    if not cls.combination_types:
        raise InputError(f"{cls.peft_type} adapters cannot be combined or re-weighted (PEFT's add_weighted_adapter is "
                         "defined for LoRA and IA3 only); merge one run at a time")
    kind = given or cls.default_combination
    if kind not in cls.combination_types:
        raise InputError(f"--combination {kind} is not defined for {cls.peft_type} adapters; they combine with: "
                         + ", ".join(cls.combination_types))
    return kind


def shard_bytes(size: str | int | None) -> int:
    """`--max-shard-size` (bytes, or a number with a unit as transformers reads it: 500MB, 2GiB) in
    bytes; unset: 5GB. Anything else is an input error naming the flag."""
    from transformers.utils.hub import convert_file_size_to_int

    if size is None:
        size = DEFAULT_SHARD_SIZE
    text = str(size).strip()
    try:
        n = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise InputError(f"--max-shard-size must be a size such as 500MB, 2GB or 4GiB (or a number of bytes), "
                         f"got {size!r}")
    return n


def _load_adapters(runs_: list, spec, reporter: Reporter):
    """The base model with every run's adapter loaded (names a0, a1, ...), and the first tokenizer."""
    from peftctl import models, runs
    from peftctl.adapters import PeftModel

    for run in runs_[1:]:
        if run.model_section.name_or_path != spec.name_or_path:
            raise InputError(
                f"{run.path} was trained on {run.model_section.name_or_path}, {runs_[0].path} on "
                f"{spec.name_or_path}: adapters on different base models cannot be merged"
            )
    how = "" if spec.quantization is None else f", quantized to {spec.quantization.bits} bits as in training"
    reporter.log(f"loading {spec.name_or_path}{how} and {len(runs_)} adapter(s)")
    base = models.load_model(spec)
    names = [f"a{i}" for i in range(len(runs_))]
    try:
        model = PeftModel.from_pretrained(base, runs_[0].path, adapter_name=names[0])
        for name, run in zip(names[1:], runs_[1:], strict=True):
            model.load_adapter(run.path, adapter_name=name)
    except (ValueError, TypeError) as e:
        raise InputError(str(e)) from None
    tokenizer = runs.load_tokenizer(runs_[0])
    models.set_pad_token(base, tokenizer)
    return model, names, tokenizer


def _combined(runs_: list, spec, weights, combination_type, density, svd_rank, reporter: Reporter):
    """(model with the one adapter to merge active, its name, tokenizer)."""
    model, names, tokenizer = _load_adapters(runs_, spec, reporter)
    model.eval()
    if len(names) == 1 and weights == [1.0]:
        return model, names[0], tokenizer
    try:
        model.add_weighted_adapter(names, weights, COMBINED, combination_type=combination_type,
                                   density=density, svd_rank=svd_rank)
    except ValueError as e:
        raise InputError(str(e)) from None
    model.set_adapter(COMBINED, inference_mode=True)
    for source in names:
        model.delete_adapter(source)
    return model, COMBINED, tokenizer


def probe_logits(model, tokenizer) -> list:
    """float32 logits (on the CPU) of the model on each probe text: (tokens, vocabulary) for a causal
    or seq2seq LM (the probe fed as the decoder's input too), (tokens, labels) for token_cls,
    (1, labels) for seq_cls."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for text in PROBES:
            ids = torch.tensor([tokenizer(text)["input_ids"][:64]], device=device)
            # An encoder-decoder reads the probe as its source and is fed it as its decoder's input too.
            decoder = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
            out.append(model(input_ids=ids, **decoder).logits.float().cpu()[0])
    return out


def distance(reference: list, other: list) -> dict[str, float]:
    """How far `other`'s logits are from `reference`'s over the probes' positions: the largest and
    mean absolute difference, the mean KL divergence of other's next-token distribution from the
    reference's (nats per token), and how often both predict the same next token."""
    import torch

    ref, oth = torch.cat(reference), torch.cat(other)
    kl = torch.nn.functional.kl_div(oth.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return {
        "max_abs_logit_diff": float((ref - oth).abs().max()),
        "mean_abs_logit_diff": float((ref - oth).abs().mean()),
        "kl_nats_per_token": float(kl),
        "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean()),
        "tokens": int(ref.shape[0]),
    }


def _release_memory() -> None:
    """Give back what models no longer referenced held (before the next large one loads)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trained_logits(runs_: list, spec, weights, combination_type, density, svd_rank, reporter: Reporter) -> list:
    """Probe logits of the model as it was trained: the quantized base with the adapter."""
    model, _, tokenizer = _combined(runs_, spec, weights, combination_type, density, svd_rank, reporter)
    return probe_logits(model, tokenizer)


# Adapters that change the model's input, not its weights: nothing to merge.
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def merged_model(run_dirs: list[str | Path], *, weights: list[float] | None = None,
                 combination_type: str | None = None, density: float | None = None,
                 svd_rank: int | None = None, reporter: Reporter | None = None):
    """(merged transformers model, tokenizer, report): the runs' adapters folded into their base in
    its original precision; the report says how far it is from the adapter model, and from the
    quantized model the adapter was trained on when it was."""
    from peftctl import runs

    reporter = reporter or Reporter()
    given = combination_type
    weights, combination_type = _check_options(len(run_dirs), weights, combination_type, None, False, None,
                                               density=density, svd_rank=svd_rank)
    runs_ = [runs.read_run(d) for d in run_dirs]
    for r in runs_:  # before any weights load
        if r.adapter_config.get("peft_type") in PROMPT_TYPES:
            raise InputError(f"{r.path}: a {r.adapter_config['peft_type']} adapter cannot be merged into the model: it "
                             "adds virtual tokens to the input (or keys and values before it), not a change to any "
                             "weight; deploy the base model with the adapter (`peftctl export RUN --format peft`)")
    combination_type = _combination_for(runs_, weights, given) or combination_type
    spec = runs_[0].model_section
    report: dict[str, Any] = {}
    trained = None
    if spec.quantization is not None:
        trained = _trained_logits(runs_, spec, weights, combination_type, density, svd_rank, reporter)
        _release_memory()
        spec = spec.model_copy(update={"quantization": None})
        reporter.log("merging into the base in its original precision")
    model, _, tokenizer = _combined(runs_, spec, weights, combination_type, density, svd_rank, reporter)
    before = probe_logits(model, tokenizer)
    merged = model.merge_and_unload(safe_merge=True)
    after = probe_logits(merged, tokenizer)
    report["max_logit_diff"] = distance(before, after)["max_abs_logit_diff"]
    report["combination_type"] = None if len(run_dirs) == 1 and weights == [1.0] else combination_type
    if trained is not None:
        report["vs_quantized_training_model"] = distance(trained, after)
        q = report["vs_quantized_training_model"]
        reporter.log(f"merged vs the quantized model as trained: top-1 agreement {q['top1_agreement']:.1%}, "
                     f"KL {q['kl_nats_per_token']:.3g} nats/token, largest logit difference "
                     f"{q['max_abs_logit_diff']:.3g}")
    report["probe_logits"] = after
    return merged, tokenizer, report


def merge_runs(run_dirs: list[str | Path], out_dir: str | Path, *, weights: list[float] | None = None,
               combination_type: str | None = None, density: float | None = None, svd_rank: int | None = None,
               adapter_only: bool = False, rank: int | None = None, dtype: str | None = None,
               quantize: str | None = None, max_shard_size: str | int | None = None,
               reporter: Reporter | None = None) -> dict[str, Any]:
    """Combine the runs' adapters (`add_weighted_adapter`; one run: itself) and write `out_dir`:
    the merged model (sharded safetensors, tokenizer, generation config), re-quantized with
    `quantize` (nf4 | fp4 | int8), or with `adapter_only` the adapter."""
    from peftctl import models, runs

    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    refuse_nonempty(out_dir)
    given = {"weights": weights, "combination_type": combination_type}  # merged_model checks them again
    weights, combination_type = _check_options(len(run_dirs), weights, combination_type, rank, adapter_only, quantize,
                                               density=density, svd_rank=svd_rank, max_shard_size=max_shard_size)
    max_shard_size = None if adapter_only else shard_bytes(max_shard_size)
    models.quiet_transformers()
    result: dict[str, Any] = {
        "output": str(out_dir),
        "adapters": [str(d) for d in run_dirs],
        "weights": weights,
        "combination_type": None if len(run_dirs) == 1 and weights == [1.0] else combination_type,
    }
    if adapter_only:
        runs_ = [runs.read_run(d) for d in run_dirs]
        for r in runs_:  # PiSSA / OLoRA: the adapter fits only the base its init changed
            init = r.adapter_config.get("init_lora_weights")
            if r.adapter_config.get("peft_type") == "LORA" and isinstance(init, str) and init != "gaussian":
                raise InputError(
                    f"{r.path}: trained with init_lora_weights: {init}, whose adapter fits only a base model "
                    "changed by that init; `peftctl export RUN --format peft` writes it as the equivalent "
                    "plain LoRA (rank 2r) that fits the original base"
                )
        combination_type = _combination_for(runs_, weights, given["combination_type"]) or combination_type
        result["combination_type"] = None if len(run_dirs) == 1 and weights == [1.0] else combination_type
        model, name, tokenizer = _combined(runs_, runs_[0].model_section, weights, combination_type, density,
                                           svd_rank, reporter)
        result["base_model"] = runs_[0].model_section.name_or_path
        if rank is not None:
            try:
                resized = model.resize_adapter_rank(name, rank)
            except ValueError as e:
                raise InputError(str(e)) from None
            result["resize"] = {"r": rank, "max_relative_error": resized["max_relative_error"]}
            reporter.log(f"rank {rank}: largest relative error {resized['max_relative_error']:.3g}")
        with atomic_dir(out_dir) as tmp:
            model.save_adapter(name, tmp)
            tokenizer.save_pretrained(tmp)
        reporter.log(f"adapter written to {out_dir}")
        config = model.peft_config[name]
        return {**result, "mode": "adapter", "method": config.method,
                **{k: getattr(config, k) for k in ("r", "lora_alpha") if hasattr(config, k)}}

    merged, tokenizer, report = merged_model(run_dirs, **given,
                                             density=density, svd_rank=svd_rank, reporter=reporter)
    spec = runs.read_run(run_dirs[0]).model_section
    out_dtype = models.resolve_dtype(dtype or spec.dtype)
    merged = merged.to(out_dtype)
    result["combination_type"] = report["combination_type"]
    result.update(base_model=spec.name_or_path, mode="model", dtype=str(out_dtype).removeprefix("torch."),
                  parameters=sum(p.numel() for p in merged.parameters()), max_logit_diff=report["max_logit_diff"])
    if "vs_quantized_training_model" in report:
        result["vs_quantized_training_model"] = report["vs_quantized_training_model"]
    if quantize is None:
        with atomic_dir(out_dir) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
        reporter.log(f"merged model written to {out_dir}")
        return result
    # bitsandbytes quantizes as transformers loads a folder: write the merged model next to
    # out_dir, load it back quantized, and remove it.
    with scratch_dir(out_dir.parent, out_dir.name, ".unquantized") as staging:
        merged.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        del merged
        _release_memory()
        result["quantized"] = _write_quantized(staging, tokenizer, report["probe_logits"], out_dir, quantize,
                                               out_dtype, max_shard_size, reporter)
    return result


def _write_quantized(folder: Path, tokenizer, merged_logits, out_dir: Path, quantize: str, dtype,
                     max_shard_size: int, reporter: Reporter) -> dict[str, Any]:
    """Load the merged model in `folder` quantized and save it to `out_dir` (transformers reads the
    quantization config back from config.json); then load what was written and say how far its
    outputs are from the merged model's, so the numbers describe the file."""
    from peftctl import models
    from peftctl.recipe import ModelSection, QuantizationSection

    spec = ModelSection(name_or_path=str(folder), dtype=str(dtype).removeprefix("torch."),
                        quantization=QuantizationSection(**QUANTIZE[quantize]))
    reporter.log(f"quantizing the merged model ({quantize})")
    quantized = models.load_model(spec)
    with atomic_dir(out_dir) as tmp:
        quantized.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    del quantized
    _release_memory()
    written = models.load_model(spec.model_copy(update={"name_or_path": str(out_dir)}))
    moved = distance(merged_logits, probe_logits(written, tokenizer))
    reporter.log(f"quantized merged model ({quantize}) written to {out_dir}; as loaded back, vs unquantized: "
                 f"top-1 agreement {moved['top1_agreement']:.1%}, KL {moved['kl_nats_per_token']:.3g} nats/token")
    return {"type": quantize, "vs_merged": moved}
