"""PEFT's public API over peftctl's adapter core: `PeftModel`, `get_peft_model`, `AutoPeftModel*`.

Code written against PEFT runs with `peft` replaced by `peftctl` in its imports. The base model's
own methods and attributes (`generate`, `config`, `num_parameters`, ...) are reachable through
the wrapper, as in PEFT.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from peftctl.adapters import io
from peftctl.adapters.config import CONFIG_NAME, AdapterConfig, TaskType
from peftctl.adapters.model import AdapterModel


class PeftModel(nn.Module):
    """PEFT's `PeftModel`, over peftctl's adapter core."""

    def __init__(self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", **kwargs):
        super().__init__()
        self.base_model = AdapterModel(model, peft_config, adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- what the wrapper is ------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.base_model.active_adapters
        return active[0] if len(active) == 1 else list(active)

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.base_model.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward; `adapter_names` gives each row of the batch its own adapter."""
        with self._rows(adapter_names, 1):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        # generate repeats each row for beams and returned sequences; the names follow their rows.
        repeat = max(kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences") or 1)
        with self._rows(adapter_names, repeat):
            return self.base_model.model.generate(*args, **kwargs)

    def _rows(self, adapter_names: list[str] | None, repeat: int):
        if adapter_names is None:
            return contextlib.nullcontext()
        return self.base_model.batch_adapters([n for n in adapter_names for _ in range(repeat)])

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, **kwargs: Any) -> None:
        """Add a new adapter (inactive, frozen until `set_adapter`)."""
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several at once; they train unless `inference_mode`."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this context; the adapters come back after it."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """A new adapter combining others (PEFT's combination types and arguments)."""
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, **kwargs)

    def resize_adapter_rank(self, adapter_name: str, r: int) -> dict[str, Any]:
        """Change an adapter's rank: growing keeps the outputs, shrinking is an SVD truncation
        whose relative error (per module and the largest) is returned."""
        return self.base_model.resize_adapter_rank(adapter_name, r)

    # ---- parameter accounting -----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit" and getattr(p, "bnb_quantized", True):
                n *= 2 * p.element_size()  # 4-bit weights pack two values per stored byte
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- saving and loading -------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool = False,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write each adapter in PEFT's format (a non-default one in a subfolder of its name).

        `save_embedding_layers=True` also writes the input and output embedding matrices, for a
        model whose vocabulary was resized.
        """
        if not safe_serialization:
            raise ValueError("peftctl writes adapter weights as safetensors only")
        if Path(save_directory).is_file():
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder")
        if not is_main_process:
            return
        names = selected_adapters or list(self.peft_config)
        self.base_model._check_names(names)
        for name in names:
            self.save_adapter(name, io.adapter_folder(save_directory, name), save_embedding_layers)

    def save_adapter(self, adapter_name: str, folder: str | os.PathLike, save_embedding_layers: bool = False) -> None:
        """Write one adapter at the root of `folder`, whatever its name (a peftctl addition)."""
        self.base_model._check_names([adapter_name])
        model = self.base_model.model
        config = self.peft_config[adapter_name]
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = io.adapter_tensors(model, adapter_name, getattr(config, "bias", "none"))
        if save_embedding_layers is True:
            tensors.update(io.embedding_tensors(model))
        io.save_tensors(tensors, folder)
        update: dict[str, Any] = {"inference_mode": True}
        if config.base_model_name_or_path is None:
            update["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
        config.model_copy(update=update).save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        subfolder: str | None = None, allow_pickle: bool = False, revision: str | None = None,
                        **kwargs: Any) -> PeftModel:
        """`model` with the adapter saved at `model_id` (a folder, or a hub id when the hub is reachable)."""
        folder = adapter_dir(model_id, subfolder, revision)
        config = (config or AdapterConfig.from_pretrained(folder)).model_copy(update={"inference_mode": not is_trainable})
        peft_model = cls(model, config, adapter_name)
        io.load_weights(peft_model.base_model.model, adapter_name, io.read_weights(folder, allow_pickle),
                        str(folder), getattr(config, "bias", "none"))
        peft_model.set_adapter(adapter_name, inference_mode=not is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, allow_pickle: bool = False, revision: str | None = None,
                     **kwargs: Any) -> None:
        """Add the adapter saved at `model_id` under `adapter_name` (not activated: see `set_adapter`)."""
        folder = adapter_dir(model_id, subfolder, revision)
        config = AdapterConfig.from_pretrained(folder).model_copy(update={"inference_mode": not is_trainable})
        self.base_model.inject_adapter(adapter_name, config)
        try:
            io.load_weights(self.base_model.model, adapter_name, io.read_weights(folder, allow_pickle),
                            str(folder), getattr(config, "bias", "none"))
        except Exception:
            self.base_model.delete_adapter(adapter_name)  # no half-loaded adapter stays behind
            raise
        if not is_trainable:
            self.eval()


def adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local folder of an adapter: `model_id` itself, or a hub download of the adapter's files."""
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    if Path(model_id).exists():
        if not folder.is_dir():
            from peftctl.userfiles import BadFileError

            raise BadFileError(folder, "not a folder (expected an adapter folder)")
        return folder
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [prefix + name for name in (CONFIG_NAME, io.WEIGHTS_NAME, io.PICKLE_WEIGHTS_NAME)]
    try:
        local = snapshot_download(str(model_id), revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, no access: say what was asked for
        raise ValueError(f"no adapter folder {model_id!r} here, and the hub could not provide it: {e}") from None
    return Path(local) / subfolder if subfolder else Path(local)


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default",
                   **kwargs: Any) -> PeftModel:
    """Wrap `model` with a new adapter, trainable unless the config says `inference_mode`."""
    if peft_config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        peft_config = peft_config.model_copy(update={"base_model_name_or_path": model.name_or_path})
    return PeftModel(model, peft_config, adapter_name)


# ---- AutoPeftModel: base model and adapter from the adapter folder alone ------------------------

_AUTO_CLASSES = {
    TaskType.CAUSAL_LM.value: "AutoModelForCausalLM",
    TaskType.SEQ_CLS.value: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS.value: "AutoModelForTokenClassification",
    TaskType.SEQ_2_SEQ_LM.value: "AutoModelForSeq2SeqLM",
    TaskType.QUESTION_ANS.value: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION.value: "AutoModel",
}


class AutoPeftModel:
    """Load the base model named in adapter_config.json (`base_model_name_or_path`) and the adapter."""

    task_type: str | None = None  # None: the adapter config's task_type decides

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        revision: str | None = None, **kwargs: Any) -> PeftModel:
        """`kwargs` go to the base model's `from_pretrained` (dtype, device_map, ...)."""
        folder = adapter_dir(pretrained_model_name_or_path, kwargs.pop("subfolder", None), revision)
        peft_config = config or AdapterConfig.from_pretrained(folder)
        base_ref = peft_config.base_model_name_or_path
        if not base_ref:
            raise ValueError(f"{folder / CONFIG_NAME} names no base model (base_model_name_or_path)")
        task = cls.task_type or peft_config.task_type or TaskType.CAUSAL_LM.value
        base = _load_base(base_ref, _AUTO_CLASSES[task], peft_config.revision, kwargs)
        return PeftModel.from_pretrained(base, folder, adapter_name, is_trainable, config=peft_config)


def _load_base(base_ref: str, auto_class: str, revision: str | None, kwargs: dict[str, Any]) -> nn.Module:
    if base_ref.endswith(".gguf"):
        # A base model peftctl read from a GGUF file: its own loader converts it.
        from peftctl import models
        from peftctl.recipe import ModelSection

        return models.load_model(ModelSection(name_or_path=base_ref), dtype=kwargs.get("dtype"))
    import transformers

    return getattr(transformers, auto_class).from_pretrained(base_ref, revision=revision, **kwargs)


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = TaskType.CAUSAL_LM.value


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = TaskType.SEQ_CLS.value


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = TaskType.TOKEN_CLS.value


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = TaskType.SEQ_2_SEQ_LM.value


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = TaskType.QUESTION_ANS.value


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = TaskType.FEATURE_EXTRACTION.value


# ---- PEFT's state-dict helpers ------------------------------------------------------------------


def get_peft_model_state_dict(model: PeftModel, state_dict=None, adapter_name: str = "default",
                              **kwargs: Any) -> dict[str, Any]:
    """One adapter's tensors under the keys PEFT saves them with."""
    config = model.peft_config[adapter_name]
    live = io.adapter_tensors(model.base_model.model, adapter_name, getattr(config, "bias", "none"))
    return {k: t.detach() for k, t in live.items()}


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, Any],
                              adapter_name: str = "default", **kwargs: Any) -> None:
    """Load tensors saved under PEFT's keys into an existing adapter (every key must fit)."""
    config = model.peft_config[adapter_name]
    io.load_weights(model.base_model.model, adapter_name, peft_model_state_dict, "state dict",
                    getattr(config, "bias", "none"))
