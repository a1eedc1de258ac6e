"""peftctl's adapter core. Importing this package is cheap: names load on first use."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterConfig": "peftctl.adapters.config",
    "TaskType": "peftctl.adapters.config",
    "LoraConfig": "peftctl.adapters.lora.config",
    "IA3Config": "peftctl.adapters.ia3.config",
    "LoHaConfig": "peftctl.adapters.loha.config",
    "LoKrConfig": "peftctl.adapters.lokr.config",
    "AdaLoraConfig": "peftctl.adapters.adalora.config",
    "VeraConfig": "peftctl.adapters.vera.config",
    "PromptTuningConfig": "peftctl.adapters.prompt_tuning.config",
    "PromptTuningInit": "peftctl.adapters.prompt_tuning.config",
    "PromptEncoderConfig": "peftctl.adapters.p_tuning.config",
    "PromptEncoderReparameterizationType": "peftctl.adapters.p_tuning.config",
    "PrefixTuningConfig": "peftctl.adapters.prefix_tuning.config",
    "AdapterLayer": "peftctl.adapters.layer",
    "AdapterModel": "peftctl.adapters.model",
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


def attach(model, config, adapter_name: str = "default"):
    """Inject a new trainable adapter described by `config` into `model`."""
    from peftctl.adapters.peft_model import get_peft_model

    return get_peft_model(model, config.model_copy(update={"inference_mode": False}), adapter_name)
