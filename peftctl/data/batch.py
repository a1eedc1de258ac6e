"""Batches for the model: padded examples, or packed sequences (see packing.py)."""

from __future__ import annotations

from peftctl.constants import IGNORE_INDEX


def collate(examples, pad_id: int, pad_left: bool = False):
    """Tensors for a list of examples: input_ids, attention_mask, labels (and position_ids if packed).

    Every key but `labels` is a model input.
    """
    import torch

    from peftctl.data.packing import Packed, collate_packed

    if isinstance(examples[0], Packed):
        return collate_packed(examples, pad_id)
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
