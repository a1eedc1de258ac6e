"""Evaluation metrics of the tasks other than causal LM (`model.task`), shared by training's
evaluations (metrics.jsonl, early stopping) and `peftctl eval`.

- seq2seq_lm: eval_loss (mean over target tokens) and `exact_match`: the share of examples whose
  greedy generation (`model.generate`, at most `max_new_tokens`) equals the target, whitespace
  normalised (runs of whitespace as one space, ends stripped).
- seq_cls: eval_loss (mean over examples), `accuracy` and macro `f1`: the unweighted mean over the
  labels present in the references or the predictions of each label's F1 = 2PR / (P + R) (0 where
  P + R = 0), which is scikit-learn's `f1_score(average="macro")`.
- token_cls: eval_loss (mean over labelled tokens: each word's first sub-token), token `accuracy`
  over those, and entity-level `f1`: seqeval's default (conlleval) definition. Entities are the
  chunks `entities` finds in each word sequence (IOB1, IOB2, IOE and IOBES tags: B-/I-/E-/S- with a
  type, or O); precision and recall are over all entities of all examples (micro average), an
  entity counting as found only when its type, start and end all match.
"""

from __future__ import annotations

from typing import Any

import torch

from peftctl.constants import IGNORE_INDEX
from peftctl.loss import _cross_entropy, task_logits


def normalize(text: str) -> str:
    return " ".join(text.split())


# ---- seqeval's entity chunks (seqeval.metrics.sequence_labeling.get_entities, default mode) ---------


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of each entity in one sequence of tags (seqeval's get_entities: a tag is
    its first character, B, I, E, S or O, and its type the rest after the first '-')."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_f1(references: list[list[str]], predictions: list[list[str]]) -> float:
    """seqeval's `f1_score` (micro average, default mode) over sequences of tags."""
    true = {(k, *e) for k, seq in enumerate(references) for e in entities(seq)}
    pred = {(k, *e) for k, seq in enumerate(predictions) for e in entities(seq)}
    correct = len(true & pred)
    p = correct / len(pred) if pred else 0.0
    r = correct / len(true) if true else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def macro_f1(references: list[int], predictions: list[int]) -> float:
    """Unweighted mean of each label's F1 over the labels in either list (scikit-learn's macro F1)."""
    scores = []
    for label in sorted(set(references) | set(predictions)):
        tp = sum(1 for t, p in zip(references, predictions, strict=True) if t == p == label)
        fp = sum(1 for t, p in zip(references, predictions, strict=True) if p == label != t)
        fn = sum(1 for t, p in zip(references, predictions, strict=True) if t == label != p)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


# ---- evaluating a model --------------------------------------------------------------------------


def _batches(examples, batch_size: int, pad_id: int, device):
    from peftctl.data import collate

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([examples[j] for j in idx], pad_id)
        yield idx, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _generate(model, tokenizer, examples, batch_size: int, device, max_new_tokens: int) -> list[str]:
    answers = [""] * len(examples)
    for idx, batch in _batches(examples, batch_size, tokenizer.pad_token_id, device):
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row], skip_special_tokens=True)
    return answers


@torch.no_grad()
def task_metrics(model, tokenizer, examples, batch_size: int, device, *, id2label: dict[int, str] | None = None,
                 max_new_tokens: int = 64, exact_match: bool = True,
                 predictions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """eval_loss, its count (`eval_tokens`: target tokens, labelled tokens, or examples), and the
    task's metrics (`TASK_METRICS`) of `examples` (`data.tasks.TaskExample`, one task) under `model`
    (in eval mode; batched by length). `id2label`: the label names (seq_cls, token_cls).

    `predictions`: a list that gets one row per example, in data order (`eval --predictions`):
    `source` ("FILE row N"), `input` (the text as the model read it), `reference`, `prediction`,
    `correct`; seq_cls labels by name with `probability` (the softmax of the predicted label);
    token_cls the tag lists of the labelled (first) sub-tokens, correct when all tags are; seq2seq
    the generated answer (exact match after whitespace normalisation)."""
    task = examples[0].task
    total, count = 0.0, 0
    refs: list = []
    preds: list = []
    probs: list[float] = []
    order: list[int] = []
    for idx, batch in _batches(examples, batch_size, tokenizer.pad_token_id, device):
        logits = task_logits(model, batch)
        labels = batch["labels"]
        total += float(_cross_entropy(logits, labels))
        count += int((labels != IGNORE_INDEX).sum())
        order += idx
        if task == "seq_cls":
            refs += labels.tolist()
            preds += logits.argmax(-1).tolist()
            if predictions is not None:
                probs += logits.float().softmax(-1).max(-1).values.tolist()
        elif task == "token_cls":
            guess = logits.argmax(-1)
            for row in range(labels.shape[0]):
                keep = labels[row] != IGNORE_INDEX
                refs.append(labels[row][keep].tolist())
                preds.append(guess[row][keep].tolist())
    result: dict[str, Any] = {"eval_loss": total / max(count, 1), "eval_tokens": count}
    if task == "seq_cls":
        result["accuracy"] = sum(t == p for t, p in zip(refs, preds, strict=True)) / len(refs)
        result["f1"] = macro_f1(refs, preds)
    elif task == "token_cls":
        flat = [(t, p) for r, q in zip(refs, preds, strict=True) for t, p in zip(r, q, strict=True)]
        result["accuracy"] = sum(t == p for t, p in flat) / max(len(flat), 1)
        names = id2label or {}
        result["f1"] = entity_f1([[names.get(t, str(t)) for t in r] for r in refs],
                                 [[names.get(p, str(p)) for p in q] for q in preds])
    elif task == "seq2seq_lm" and (exact_match or predictions is not None):
        answers = _generate(model, tokenizer, examples, batch_size, device, max_new_tokens)
        hits = [normalize(a) == normalize(e.reference) for a, e in zip(answers, examples, strict=True)]
        if exact_match:
            result["exact_match"] = sum(hits) / len(hits)
            result["samples"] = [{"reference": e.reference, "prediction": a.strip(), "correct": h}
                                 for a, e, h in list(zip(answers, examples, hits, strict=True))[:5]]
        if predictions is not None:
            predictions += [_row(e, tokenizer, e.reference, a.strip(), h)
                            for e, a, h in zip(examples, answers, hits, strict=True)]
    if predictions is not None and task != "seq2seq_lm":
        names = id2label or {}
        rows: dict[int, dict[str, Any]] = {}
        for k, i in enumerate(order):
            if task == "seq_cls":
                ref, pred = names.get(refs[k], refs[k]), names.get(preds[k], preds[k])
                rows[i] = _row(examples[i], tokenizer, ref, pred, refs[k] == preds[k], probability=probs[k])
            else:
                ref, pred = [names.get(t, t) for t in refs[k]], [names.get(p, p) for p in preds[k]]
                rows[i] = _row(examples[i], tokenizer, ref, pred, ref == pred)
        predictions += [rows[i] for i in range(len(examples))]
    return result


def _row(example, tokenizer, reference, prediction, correct: bool, probability: float | None = None) -> dict:
    row = {"source": example.source, "input": tokenizer.decode(example.input_ids, skip_special_tokens=True),
           "reference": reference, "prediction": prediction, "correct": bool(correct)}
    if probability is not None:
        row["probability"] = probability
    return row
