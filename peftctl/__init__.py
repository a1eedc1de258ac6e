"""peftctl: parameter-efficient fine-tuning driven by YAML recipes, with PEFT's Python API.

`from peftctl import LoraConfig, get_peft_model, PeftModel` works like PEFT's imports. Names load
on first use, so importing peftctl (and `peftctl --help`) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "peftctl.adapters.config",
    "TaskType": "peftctl.adapters.config",
    "LoraConfig": "peftctl.adapters.lora.config",
    "PeftConfig": "peftctl.adapters.config",
    "PeftType": "peftctl.adapters.config",
    "PeftModel": "peftctl.adapters.peft_model",
    "get_peft_model": "peftctl.adapters.peft_model",
    "get_peft_model_state_dict": "peftctl.adapters.peft_model",
    "set_peft_model_state_dict": "peftctl.adapters.peft_model",
    "AutoPeftModel": "peftctl.adapters.peft_model",
    "AutoPeftModelForCausalLM": "peftctl.adapters.peft_model",
    "AutoPeftModelForSequenceClassification": "peftctl.adapters.peft_model",
    "AutoPeftModelForTokenClassification": "peftctl.adapters.peft_model",
    "AutoPeftModelForSeq2SeqLM": "peftctl.adapters.peft_model",
    "AutoPeftModelForQuestionAnswering": "peftctl.adapters.peft_model",
    "AutoPeftModelForFeatureExtraction": "peftctl.adapters.peft_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
