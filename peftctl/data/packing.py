"""Packing: several examples in one sequence of up to `max_length` tokens, with no attention between them.

Each packed sequence restarts its position ids at every example, and the first token of each
example carries no loss (the token before it belongs to another example). How the boundaries reach
the attention depends on the attention implementation (`layout`):

- "bool" (SDPA) and "additive" (eager): a 4D block-diagonal causal mask of shape (B, 1, L, L),
  boolean or additive float. transformers passes a 4D mask to the attention unchanged. Padding
  positions in a packed row are one-token blocks (each attends only to itself, so no row of the
  mask is empty) with position id 0; real examples always have at least two tokens, which is how
  `count_input_tokens` tells padding apart.
- "varlen" (flash attention): the batch's sequences are laid end to end in one row without padding
  or mask; transformers derives the variable-length kernel's boundaries from the position ids.
- "cu_seqlens" (SDPA models whose attention peftctl's fused forward runs, `FUSED_VARLEN`): one row
  as for "varlen", plus the boundaries computed here on the host (`cu_seq_lens_q/k`, int32 cumulative
  lengths; `max_length_q/k`, the longest sequence), which `adapters.lora.fused` hands to
  `kernels.varlen`; the attention mask is a (1, 1, 1, 1) placeholder that transformers passes on
  unchanged, so it builds no (tokens x tokens) mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from peftctl.constants import IGNORE_INDEX
from peftctl.data.store import ExampleSet
from peftctl.errors import InputError


@dataclass
class Packed:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    layout: str


# The attention "implementation" a run passes to `data.build` when peftctl's fused forward attends
# packed batches itself (see `adapters.lora.fused.varlen_supported`).
FUSED_VARLEN = "peftctl_varlen"


def layout_for(attention: str | None) -> str:
    """How packed batches carry their boundaries for a model's attention implementation."""
    attention = attention or "sdpa"
    if attention == FUSED_VARLEN:
        return "cu_seqlens"
    if "flash" in attention:  # flash_attention_2, flash_attention_3, kernels' flash-attn
        return "varlen"
    if attention == "sdpa":
        return "bool"
    if attention == "eager":
        return "additive"
    raise InputError(
        f"data.packing: the attention implementation {attention!r} is not supported with packing; "
        "use sdpa, eager or flash_attention_2 (model.attn_implementation)"
    )


def best_fit(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: each example, longest first, goes into the fullest bin it fits in."""
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (free space, bin id), kept sorted
    bins: list[list[int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return [np.asarray(b, dtype=np.int64) for b in bins]


class PackedSet(Sequence):
    """Packed sequences over an ExampleSet; indexing builds one Packed sequence."""

    def __init__(self, examples: ExampleSet, bins: list[np.ndarray], layout: str, max_length: int):
        self.examples, self.bins, self.layout, self.max_length = examples, bins, layout, max_length

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, k: int) -> Packed:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for j in self.bins[k].tolist():
            e = self.examples[j]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]  # the previous token is another example's
            positions += range(len(e.input_ids))
        return Packed(ids, labels, positions, self.layout)

    def __iter__(self) -> Iterator[Packed]:
        for k in range(len(self)):
            yield self[k]

    def fill(self) -> float:
        """The fraction of packed positions that hold tokens."""
        if not self.bins:
            return 0.0
        return float(self.examples.lengths().sum()) / (len(self.bins) * self.max_length)


def pack(examples: ExampleSet, max_length: int, layout: str) -> PackedSet:
    return PackedSet(examples, best_fit(examples.lengths(), max_length), layout, max_length)


def collate_packed(sequences: list[Packed], pad_id: int):
    import torch

    layout = sequences[0].layout
    if layout == "cu_seqlens":
        positions = [p for s in sequences for p in s.position_ids]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        cu = torch.tensor(starts, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        return {
            "input_ids": torch.tensor([[t for s in sequences for t in s.input_ids]], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": torch.tensor([[y for s in sequences for y in s.labels]], dtype=torch.long),
            "attention_mask": torch.ones((1, 1, 1, 1), dtype=torch.bool),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
        }
    if layout == "varlen":
        ids = [t for s in sequences for t in s.input_ids]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([[p for s in sequences for p in s.position_ids]], dtype=torch.long),
            "labels": torch.tensor([[y for s in sequences for y in s.labels]], dtype=torch.long),
        }
    length = max(len(s.input_ids) for s in sequences)
    n = len(sequences)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    # Block ids: one per example; every padding position a block of its own.
    blocks = torch.arange(length, dtype=torch.long).repeat(n, 1) + length
    for i, s in enumerate(sequences):
        m = len(s.input_ids)
        ids[i, :m] = torch.tensor(s.input_ids)
        labels[i, :m] = torch.tensor(s.labels)
        pos = torch.tensor(s.position_ids)
        positions[i, :m] = pos
        blocks[i, :m] = torch.cumsum((pos == 0).long(), 0)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (blocks[:, :, None] == blocks[:, None, :]) & causal
    mask = mask[:, None]
    if layout == "additive":
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
