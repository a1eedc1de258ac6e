"""Batches for the model: padded examples, or packed sequences (see packing.py)."""

from __future__ import annotations

from peftctl.constants import IGNORE_INDEX


def collate(examples, pad_id: int, pad_left: bool = False):
    """Tensors for a list of examples: input_ids, attention_mask, labels (and position_ids if packed).

    Every key but `labels` is a model input.
    """
    import torch

    from peftctl.data.packing import Packed, collate_packed
    from peftctl.data.tasks import TaskExample

    if isinstance(examples[0], Packed):
        return collate_packed(examples, pad_id)
    if isinstance(examples[0], TaskExample):
        return collate_task(examples, pad_id)
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(length - n, length) if pad_left else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# The batch key that names a task other than causal LM (a string, not a model input: the loss removes it).
TASK_KEY = "task"


def collate_task(examples, pad_id: int):
    """Tensors for `tasks.TaskExample`s (right padding): input_ids, attention_mask (and token_type_ids
    when the tokenizer gives them), labels, and `task`. labels: seq_cls (batch,) label ids; token_cls
    (batch, seq) with -100 on padding; seq2seq_lm (batch, target length), the decoder's labels, -100
    on padding."""
    import torch

    task = examples[0].task
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    types = torch.zeros((len(examples), length), dtype=torch.long) if examples[0].token_type_ids is not None else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(e.token_type_ids)
    if task == "seq_cls":
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        width = length if task == "token_cls" else max(len(e.labels) for e in examples)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, TASK_KEY: task}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def count_input_tokens(batch) -> int:
    """Real (non-padding) input tokens in a batch from `collate`, packed or not."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    positions = batch.get("position_ids")
    if positions is None:
        return batch["input_ids"].numel()
    # Packed: padding is one-token blocks at position 0; every example has at least two tokens, so
    # a position 0 followed by another position 0 (or by the end of the row) is padding.
    nxt = positions.new_zeros(positions.shape)
    nxt[:, :-1] = positions[:, 1:]
    return int(positions.numel() - ((positions == 0) & (nxt == 0)).sum())
