"""peftctl: parameter-efficient fine-tuning driven by YAML recipes, with PEFT's Python API.

`from peftctl import LoraConfig, get_peft_model, PeftModel` works like PEFT's imports: the adapter
core's public names (peftctl.adapters) are re-exported here. They load on first use, so importing
peftctl (and `peftctl --help`) stays fast.
"""

from __future__ import annotations

from peftctl import adapters as _adapters  # cheap: its own names load on first use
from peftctl.constants import VERSION

__version__ = VERSION

__all__ = list(_adapters.__all__)


def __getattr__(name: str):
    if name in _adapters.__all__:
        return getattr(_adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
