"""Tokenized examples as flat arrays on disk, memory-mapped back: what the cache holds.

A `Table` is one source's examples: all token ids in one int32 array, a loss mask beside it, and
per-example offsets, row numbers and flags. Reading it maps the files instead of loading them, so
a data set larger than memory trains fine. An `ExampleSet` selects (and repeats) examples from
several tables: the train or eval data of a recipe after mixing and splitting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftctl.constants import IGNORE_INDEX

FORMAT_VERSION = 3  # 2: tokens never straddle a prompt / response boundary; 3: pairs truncated together (tokenize.py)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    prompt_ids: list[int] | None = None  # the prompt alone, for generation-based scoring
    reference: str | None = None
    truncated: bool = False
    source: str | None = None  # "FILE row N", for messages and `peftctl data --show`
    rejected: Example | None = None  # preference data: the rejected response

    @property
    def num_loss_tokens(self) -> int:
        # Position 0 never carries loss: nothing precedes it.
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


# Flat arrays (one entry per token) are raw .bin files; per-example arrays are .npy.
_FLAT = {"ids": np.int32, "loss": np.uint8, "prompt_ids": np.int32, "rejected_ids": np.int32,
         "rejected_loss": np.uint8}
_PER_EXAMPLE_TYPES = {"rows": np.int64, "files": np.int32, "truncated": bool, "loss_tokens": np.int32}
_PER_EXAMPLE = ("offsets", "prompt_offsets", "rejected_offsets", *_PER_EXAMPLE_TYPES)


class TableWriter:
    """Appends tokenized examples to a table folder, batch by batch."""

    def __init__(self, folder: Path, *, prompts: bool, rejected: bool):
        self.folder = folder
        self.prompts, self.rejected = prompts, rejected
        names = ["ids", "loss"] + (["prompt_ids"] if prompts else []) + (["rejected_ids", "rejected_loss"] if rejected else [])
        self.files = {n: open(folder / f"{n}.bin", "wb") for n in names}
        self.lengths: dict[str, list[np.ndarray]] = {"offsets": [], "prompt_offsets": [], "rejected_offsets": []}
        self.per_example: dict[str, list[np.ndarray]] = {name: [] for name in _PER_EXAMPLE_TYPES}
        self.references: list[str | None] = []
        self.count = 0

    def write(self, ids: list[np.ndarray], loss: list[np.ndarray], rows: list[int], files: list[int],
              truncated: list[bool], prompts: list[np.ndarray] | None = None, references: list[str | None] | None = None,
              rejected: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> None:
        if not ids:
            return
        self._flat("ids", "offsets", ids)
        self.files["loss"].write(np.concatenate(loss).astype(np.uint8).tobytes())
        # Position 0 never carries loss (nothing precedes it), so it is not counted.
        columns = {"rows": rows, "files": files, "truncated": truncated,
                   "loss_tokens": [int(m[1:].sum()) for m in loss]}
        for name, values in columns.items():
            self.per_example[name].append(np.asarray(values, dtype=_PER_EXAMPLE_TYPES[name]))
        if self.prompts:
            self._flat("prompt_ids", "prompt_offsets", prompts)
            self.references.extend(references)
        if self.rejected:
            self._flat("rejected_ids", "rejected_offsets", rejected[0])
            self.files["rejected_loss"].write(np.concatenate(rejected[1]).astype(np.uint8).tobytes())
        self.count += len(ids)

    def _flat(self, name: str, offsets: str, arrays: list[np.ndarray]) -> None:
        self.files[name].write(np.concatenate(arrays).astype(_FLAT[name]).tobytes())
        self.lengths[offsets].append(np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays)))

    def close(self, meta: dict[str, Any]) -> None:
        """Finish the table: meta.json, written last, marks it complete. (The folder reaches the disk
        whole before it is renamed into the cache: `fsio.atomic_dir`.)"""
        for f in self.files.values():
            f.close()
        offsets = ["offsets"] + (["prompt_offsets"] if self.prompts else []) + (["rejected_offsets"] if self.rejected else [])
        for name in offsets:
            arr = np.zeros(self.count + 1, dtype=np.int64)
            if self.lengths[name]:
                np.cumsum(np.concatenate(self.lengths[name]), out=arr[1:])
            self._save(f"{name}.npy", arr)
        for name, dtype in _PER_EXAMPLE_TYPES.items():
            parts = self.per_example[name]
            self._save(f"{name}.npy", np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
        if self.prompts:
            self._save("references.json", json.dumps(self.references).encode())
        meta = {**meta, "format_version": FORMAT_VERSION, "count": self.count, "prompts": self.prompts,
                "rejected": self.rejected}
        self._save("meta.json", json.dumps(meta, indent=1).encode())

    def _save(self, name: str, data: np.ndarray | bytes) -> None:
        with open(self.folder / name, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                np.save(f, data)


class Table:
    """One source's tokenized examples (arrays memory-mapped from a table folder)."""

    def __init__(self, folder: Path, in_memory: bool = False):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        self.names: list[str] = self.meta["names"]
        self.arrays: dict[str, np.ndarray] = {}
        for name in _PER_EXAMPLE:
            if (folder / f"{name}.npy").exists():
                self.arrays[name] = np.load(folder / f"{name}.npy", mmap_mode=None if in_memory else "r")
        for name, dtype in _FLAT.items():
            path = folder / f"{name}.bin"
            if not path.exists():
                continue
            if path.stat().st_size == 0:
                self.arrays[name] = np.zeros(0, dtype=dtype)
            elif in_memory:
                self.arrays[name] = np.fromfile(path, dtype=dtype)
            else:
                self.arrays[name] = np.memmap(path, dtype=dtype, mode="r")
        self.references: list[str | None] | None = None
        if (folder / "references.json").exists():
            self.references = json.loads((folder / "references.json").read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def stats(self) -> dict[str, int]:
        return self.meta["stats"]

    def lengths(self) -> np.ndarray:
        return np.diff(self.arrays["offsets"])

    def _slice(self, name: str, offsets: str, i: int) -> np.ndarray:
        o = self.arrays[offsets]
        return self.arrays[name][o[i] : o[i + 1]]

    def _ids_labels(self, ids_name: str, loss_name: str, offsets: str, i: int) -> tuple[list[int], list[int]]:
        ids = np.asarray(self._slice(ids_name, offsets, i), dtype=np.int64)
        loss = self._slice(loss_name, offsets, i).astype(bool)
        return ids.tolist(), np.where(loss, ids, IGNORE_INDEX).tolist()

    def example(self, i: int) -> Example:
        ids, labels = self._ids_labels("ids", "loss", "offsets", i)
        a = self.arrays
        ex = Example(ids, labels, truncated=bool(a["truncated"][i]),
                     source=f"{self.names[int(a['files'][i])]} row {int(a['rows'][i])}")
        if "prompt_ids" in a:
            ex.prompt_ids = np.asarray(self._slice("prompt_ids", "prompt_offsets", i), dtype=np.int64).tolist()
            ex.reference = self.references[i]
        if "rejected_ids" in a:
            r_ids, r_labels = self._ids_labels("rejected_ids", "rejected_loss", "rejected_offsets", i)
            ex.rejected = Example(r_ids, r_labels, source=ex.source)
        return ex

    def loss_counts(self) -> np.ndarray:
        return self.arrays["loss_tokens"]

    def identical_pairs(self) -> int:
        """Preference pairs whose chosen and rejected sequences are the same tokens (0 without pairs):
        their loss cannot move (DPO's stays ln 2). Vectorized over the pairs of equal length."""
        a = self.arrays
        if "rejected_offsets" not in a or not len(self):
            return 0
        oc, orr = a["offsets"], a["rejected_offsets"]
        lc, lr = np.diff(oc), np.diff(orr)
        cand = np.flatnonzero((lc == lr) & (lc > 0))
        if not len(cand):
            return 0
        lens = lc[cand]
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        same = (np.asarray(a["ids"])[np.repeat(oc[cand], lens) + within]
                == np.asarray(a["rejected_ids"])[np.repeat(orr[cand], lens) + within])
        differing = np.add.reduceat(~same, np.cumsum(lens) - lens)
        return int((differing == 0).sum())


class ExampleSet(Sequence):
    """Examples chosen from tables: `which[k]` of table `table[k]`. Indexing builds an Example."""

    def __init__(self, tables: list[Table], table: np.ndarray, which: np.ndarray):
        self.tables, self.table, self.which = tables, table, which

    @classmethod
    def concat(cls, tables: list[Table]) -> ExampleSet:
        table = np.concatenate([np.full(len(t), i, dtype=np.int32) for i, t in enumerate(tables)]) if tables else np.zeros(0, np.int32)
        which = np.concatenate([np.arange(len(t), dtype=np.int64) for t in tables]) if tables else np.zeros(0, np.int64)
        return cls(tables, table, which)

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.take(np.arange(len(self))[k])
        return self.tables[int(self.table[k])].example(int(self.which[k]))

    def __iter__(self) -> Iterator[Example]:
        for k in range(len(self)):
            yield self[k]

    def take(self, indices: np.ndarray) -> ExampleSet:
        return ExampleSet(self.tables, self.table[indices], self.which[indices])

    def _per_table(self, per_table: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.int64)
        for i, values in enumerate(per_table):
            sel = self.table == i
            out[sel] = values[self.which[sel]]
        return out

    def lengths(self) -> np.ndarray:
        return self._per_table([t.lengths() for t in self.tables])

    def loss_counts(self) -> np.ndarray:
        return self._per_table([t.loss_counts() for t in self.tables])

    def truncated(self) -> np.ndarray:
        return self._per_table([np.asarray(t.arrays["truncated"], dtype=np.int64) for t in self.tables]).astype(bool)

