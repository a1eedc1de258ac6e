"""Data: sources → rows → rendered text with loss spans → token ids and labels → (packed) batches.

The public names, imported lazily so that `import peftctl.data.formats` (the recipe schema does)
stays free of numpy and torch:

- `build(data_section, tokenizer, seed, attention=..., reporter=...)` → `Data` (pipeline.py)
- `Example`, `ExampleSet` (store.py): examples with labels, `IGNORE_INDEX` (-100, from
  `peftctl.constants`) where no loss
- `collate(examples, pad_id)`, `count_input_tokens(batch)` (batch.py): tensors for the model
- `pack`, `Packed` (packing.py); `use_chat_template` (templates.py)
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "build": "pipeline", "Data": "pipeline", "DataStats": "pipeline",
    "Example": "store", "ExampleSet": "store", "IGNORE_INDEX": "store",
    "collate": "batch", "count_input_tokens": "batch",
    "pack": "packing", "Packed": "packing",
    "use_chat_template": "templates",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'peftctl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftctl.data.{_HOME[name]}"), name)
