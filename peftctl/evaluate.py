"""`peftctl eval`: loss, perplexity and exact match on a recipe's eval data, base or adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peftctl.errors import InputError
from peftctl.ui import Reporter


def _normalize(text: str) -> str:
    return " ".join(text.split())


def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             device, reporter: Reporter | None = None, probabilities: list[float] | None = None) -> list[str]:
    """Greedy answers to tokenized prompts, batched by similar length (left padding).

    `probabilities`: a list that gets, for each answer in order, the probability the model gives it
    (temperature 1): the product over its tokens, the EOS that ends it included, of softmax(logits)
    at the chosen token, from generate's raw logits (float32). For an answer cut at max_new_tokens it
    is the probability of the tokens made."""
    import torch

    from peftctl.models import stop_token_ids

    eos = set(stop_token_ids(model, tokenizer))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    probs: list[float] = [0.0] * len(prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, length - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, length - len(prompts[i]) :] = 1
        extra = {"return_dict_in_generate": True, "output_logits": True} if probabilities is not None else {}
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos), **extra,
            )
        sequences = out.sequences if probabilities is not None else out
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(sequences[row, length:], skip_special_tokens=True)
            if probabilities is not None:
                logp = 0.0
                for t, tok in enumerate(sequences[row, length:].tolist()):
                    logp += torch.log_softmax(out.logits[t][row].float(), -1)[tok].item()
                    if tok in eos:
                        break
                probs[i] = math.exp(logp)
        if reporter:
            reporter.advance(min(start + batch_size, len(order)), {})
    if probabilities is not None:
        probabilities.extend(probs)
    return answers


def is_classification(data) -> bool:
    """Whether every eval source of a recipe's data section is `format: classification` (the text, a
    newline, the label as the answer): its predictions then carry the label's probability."""
    sources = data.eval or data.train
    return all((s.format or data.format) == "classification" for s in sources)


def prediction_row(example, tokenizer, prediction: str, correct: bool, probability: float | None) -> dict[str, Any]:
    """One line of `--predictions`: where the example comes from ("FILE row N"), its input (the prompt
    as the model read it, special tokens included), the reference answer, the prediction, whether
    they match (exact match: equal after collapsing whitespace) and, for classification, the
    probability the model gives its predicted label."""
    row = {"source": example.source, "input": tokenizer.decode(example.prompt_ids, skip_special_tokens=False),
           "reference": example.reference, "prediction": prediction, "correct": correct}
    if probability is not None:
        row["probability"] = probability
    return row


def score(model, tokenizer, examples, cfg, device, reporter: Reporter | None = None, objective=None,
          ref=None, predictions: list[dict[str, Any]] | None = None, classification: bool = False) -> dict[str, Any]:
    """eval_loss (mean over loss tokens), perplexity, and exact match where references exist. With a
    preference `objective` (`preference.Objective`) on pairs: its eval_loss and TRL's metrics
    (eval_rewards/accuracies, ...; `ref`: (N, 2) reference log-probabilities, else the model with
    its adapters disabled), and exact match on the chosen answers.
    `predictions`: a list that gets a `prediction_row` for every scored example, in data order (with
    the label's probability when `classification`)."""
    from peftctl.loss import eval_loss

    reporter = reporter or Reporter()
    model.eval()
    if objective is not None and objective.pairs:
        from peftctl.preference import eval_metrics, eval_sums

        result: dict[str, Any] = {"examples": len(examples), **eval_metrics(
            objective, eval_sums(objective, model, examples, cfg.batch_size, tokenizer.pad_token_id, device, ref))}
    else:
        loss, n = eval_loss(model, examples, cfg.batch_size, tokenizer.pad_token_id, device)
        result = {
            "examples": len(examples),
            "eval_loss": loss / n,
            "perplexity": math.exp(min(loss / n, 50)),
            "eval_tokens": n,
        }
    scored = [e for e in examples if e.prompt_ids is not None and e.reference is not None]
    if cfg.exact_match and scored:
        reporter.start(len(scored), "generate", unit="answers")
        probs: list[float] | None = [] if predictions is not None and classification else None
        answers = generate(model, tokenizer, [e.prompt_ids for e in scored], cfg.batch_size,
                           cfg.max_new_tokens, device, reporter, probabilities=probs)
        reporter.stop()
        hits = [_normalize(a) == _normalize(e.reference) for a, e in zip(answers, scored, strict=True)]
        result["exact_match"] = sum(hits) / len(hits)
        result["exact_match_n"] = len(hits)
        result["samples"] = [
            {"reference": e.reference, "prediction": a.strip(), "correct": h}
            for a, e, h in list(zip(answers, scored, hits, strict=True))[:5]
        ]
        if predictions is not None:
            predictions.extend(
                prediction_row(e, tokenizer, a.strip(), h, probs[k] if probs is not None else None)
                for k, (a, e, h) in enumerate(zip(answers, scored, hits, strict=True))
            )
    return result


def _with_run_labels(recipe, run):
    """The recipe with `model.labels` (seq_cls, token_cls): with a run, the run's, as its recipe.yaml
    recorded them (the head was trained for those; a recipe whose own labels differ is an InputError
    naming both); else the recipe's own; else the training data's."""
    from peftctl.sections import LABELLED_TASKS

    if recipe.model.task_name not in LABELLED_TASKS:
        return recipe
    labels = getattr(getattr(getattr(run, "recipe", None), "model", None), "labels", None)
    if labels and recipe.model.labels and list(recipe.model.labels) != list(labels):
        raise InputError(f"model.labels [{', '.join(map(str, recipe.model.labels))}] differ from the run's "
                         f"[{', '.join(map(str, labels))}] (its recipe.yaml; the head was trained for those, "
                         f"in that order): drop model.labels or set them as the run has them")
    if recipe.model.labels:
        return recipe
    if not labels:
        from peftctl.data.tasks import label_names

        labels = label_names(recipe.model.task_name, recipe.data)
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"labels": labels})})


def _run_reference(run_dir: Path, examples, model, init: str, reporter):
    """The eval split's reference log-probabilities the run itself used (its
    reference_logps.safetensors) when these are the pairs it computed them on, else None. When
    they are not, the reference is computed from train.init_adapter, which must still hold the
    weights the run started from (InputError otherwise: another reference, other rewards)."""
    from safetensors import safe_open

    from peftctl.train import REFERENCE_FILE, reference
    from peftctl.userfiles import load_safetensors

    path = run_dir / REFERENCE_FILE
    if not path.is_file() and run_dir.parent.name == "checkpoints":  # a checkpoint of the run
        path = run_dir.parent.parent / REFERENCE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("eval_pairs") == reference.pairs_digest(examples):
        got = load_safetensors(path).get("eval")
        if got is not None and tuple(got.shape) == (len(examples), 2):
            reporter.log(f"reference log-probabilities of the run ({path})")
            return got
    weights = meta.get("init_adapter_weights")
    if weights is not None and weights != reference.adapter_digest(model):
        raise InputError(f"train.init_adapter {init}: its weights are no longer those the run started from "
                         f"(recorded in {path}), so the run's reference cannot be computed again for these "
                         "eval pairs; evaluate on the run's own eval data or restore that adapter")
    return None


def evaluate(recipe, adapter: str | Path | None = None, base: bool = False,
             reporter: Reporter | None = None, predictions: str | Path | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Evaluate the recipe's base model, or it with an adapter (default: the recipe's run folder).

    `predictions`: a JSON-lines file to write (atomically) with one `prediction_row` per example
    that has a reference answer, in data order; an existing file is refused unless `overwrite`, and
    the path is checked before anything loads. The result then names it (`predictions`)."""
    import torch

    from peftctl import data as data_lib
    from peftctl import models, runs
    from peftctl.adapters.io import has_adapter
    from peftctl.fsio import atomic_file, check_output_file

    reporter = reporter or Reporter()
    if recipe.data.eval is None and recipe.data.eval_split is None:  # before anything loads
        raise InputError("no eval data: set data.eval or data.eval_split in the recipe")
    if predictions is not None:
        check_output_file(predictions, "--predictions", overwrite, hint="choose another path or pass --overwrite")
        if not recipe.eval.exact_match:
            raise InputError("--predictions: eval.exact_match is off in the recipe, so no answer is generated; "
                             "set eval.exact_match: true")
    if not base and adapter is None:
        adapter = recipe.output.dir
        if not has_adapter(adapter):
            raise InputError(
                f"no adapter in {adapter} (the recipe's output.dir); pass --adapter RUN_DIR, or --base"
            )
    # The base model's files before the data is read (a truncated weights file is an error now).
    models.check_model_files(recipe.model, models.resolve(recipe.model.name_or_path, recipe.model.cache_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base:
        tokenizer = models.load_tokenizer(recipe.model)
    else:
        run = runs.read_run(adapter)
        tokenizer = runs.load_tokenizer(run)
    recipe = _with_run_labels(recipe, None if base else run)
    dataset = data_lib.build(recipe.data, tokenizer, seed=recipe.train.seed, task=recipe.model.task_name,
                             labels=recipe.model.labels)
    if not dataset.eval:
        raise InputError("no eval data: set data.eval or data.eval_split in the recipe")
    examples = dataset.eval[: recipe.eval.max_examples] if recipe.eval.max_examples else dataset.eval
    if predictions is not None and recipe.model.task_name == "causal_lm" and \
            not any(e.prompt_ids is not None and e.reference is not None for e in examples):
        raise InputError(f"--predictions: no eval example has a reference answer to predict (format "
                         f"{recipe.data.format!r} gives none); use data with responses")
    reporter.log(f"evaluating {'the base model' if base else adapter} on {len(examples)} examples")
    # A new head (seq_cls, token_cls) starts as training's does (train seeds right before its load):
    # the "before" number is reproducible and is the one training starts from.
    torch.manual_seed(recipe.train.seed)
    model = models.load_model(recipe.model, device_map={"": device} if device.type == "cuda" else None)
    models.set_pad_token(model, tokenizer)
    from peftctl.preference import Objective
    from peftctl.train.reference import reference_logps as cached_reference

    objective = Objective.of(recipe.train)
    ref = None
    init = recipe.train.init_adapter
    if not base and objective.needs_reference and init is not None:
        # The reference is the model the run started from: the base with train.init_adapter.
        from peftctl.train.checkpoint import check_same_adapter, load_adapter

        model = runs.attach_saved_adapter(model, adapter)  # the run's adapter, with its own config
        check_same_adapter(model.peft_config["default"], Path(init), "train.init_adapter", f"the run's ({adapter})")
        load_adapter(model, Path(init))
        ref = _run_reference(Path(adapter), examples, model, init, reporter)
        if ref is None:
            # Computed once and kept in the data cache, as training keeps its own (train.reference).
            ref = cached_reference(recipe, model, {"eval": examples}, tokenizer.pad_token_id, None, reporter,
                                   device=device)["eval"]
        load_adapter(model, Path(adapter))
    elif not base:
        model = runs.attach_saved_adapter(model, adapter)
    # Every token has an embedding row (an id past the last one fails mid-evaluation otherwise).
    rows = models.embedding_rows(model)
    if rows is not None:
        models.check_token_ids(tokenizer.get_vocab(), rows,
                               models.tokenizer_name(recipe.model) if base else f"{adapter}: the run's tokenizer")
    rows: list[dict[str, Any]] | None = [] if predictions is not None else None
    if recipe.model.task_name != "causal_lm":
        from peftctl.metrics import task_metrics

        model.eval()
        result = {"examples": len(examples), **task_metrics(
            model, tokenizer, examples, recipe.eval.batch_size, device,
            id2label=dict(enumerate(recipe.model.labels or [])), max_new_tokens=recipe.eval.max_new_tokens,
            exact_match=recipe.eval.exact_match, predictions=rows)}
        if "exact_match" in result:
            result["exact_match_n"] = len(examples)
        if recipe.model.task_name == "seq2seq_lm":
            result["perplexity"] = math.exp(min(result["eval_loss"], 50))
    else:
        result = score(model, tokenizer, examples, recipe.eval, device, reporter, objective, ref, predictions=rows,
                       classification=is_classification(recipe.data))
    result = {"model": recipe.model.name_or_path, "adapter": None if base else str(adapter), **result}
    if rows is not None:
        with atomic_file(predictions) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        result["predictions"] = str(predictions)
    return result
