"""PEFT's public API over peftctl's adapter core: `PeftModel`, `get_peft_model`, `AutoPeftModel*`.

Code written against PEFT runs with `peft` replaced by `peftctl` in its imports. The base model's
own methods and attributes (`generate`, `config`, `num_parameters`, ...) are reachable through
the wrapper, as in PEFT.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from peftctl.adapters import io
from peftctl.adapters.config import CONFIG_NAME, AdapterConfig, TaskType
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.matching import peft_safe_patterns
from peftctl.adapters.model import AdapterModel


def _check_options(autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                   mixed: bool = False) -> None:
    """PEFT's keyword arguments that peftctl does not implement: their default, or a ValueError naming them."""
    if autocast_adapter_dtype is not True:
        raise ValueError("autocast_adapter_dtype=False (adapter weights in the base layer's dtype) is not supported: "
                         "peftctl keeps adapter weights in float32 and casts them to the activations' dtype")
    if ephemeral_gpu_offload:
        raise ValueError("ephemeral_gpu_offload=True is not supported by peftctl")
    if mixed:
        raise ValueError("mixed=True (PEFT's PeftMixedModel, adapters of several methods) is not supported by peftctl")


# Task types whose PEFT model class (PeftModelForCausalLM, PeftModelForSeq2SeqLM) needs the base model's
# generation hooks: PEFT cannot wrap, nor load an adapter onto, a module without them.
_GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def _check_task_type(model: nn.Module, config: AdapterConfig) -> None:
    """Warn when a new adapter's task type is one PEFT cannot use with this module: peftctl wraps any
    module the same way whatever the task type (the forward passes every argument through), but PEFT's
    PeftModelForCausalLM / PeftModelForSeq2SeqLM read `prepare_inputs_for_generation`, which only
    transformers' generative models have, so PEFT could not load the saved adapter as it is."""
    task = getattr(config.task_type, "value", config.task_type)
    if task in _GENERATIVE_TASKS and not callable(getattr(model, "prepare_inputs_for_generation", None)):
        warnings.warn(
            f"task_type={task} on a {type(model).__name__}, which is not a transformers generative model (it has "
            "no prepare_inputs_for_generation): peftctl ignores the task type for it, but PEFT cannot load the "
            "saved adapter onto such a model; leave task_type unset (None) for a custom module",
            UserWarning, stacklevel=3)


class PeftModel(nn.Module):
    """PEFT's `PeftModel`, over peftctl's adapter core.

    Every keyword of PEFT's API is accepted: it works as in PEFT, or raises a ValueError naming it
    (`autocast_adapter_dtype=False`, `ephemeral_gpu_offload=True`, `mixed=True`). Unknown keywords
    raise TypeError. `low_cpu_mem_usage` only changes where PEFT first allocates the adapter's weights;
    here they are always created in full, with the same result.
    """

    def __init__(self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        super().__init__()
        _check_options(autocast_adapter_dtype)
        _check_task_type(model, peft_config)
        self.base_model = AdapterModel(model, peft_config, adapter_name)
        self.training = model.training

    @classmethod
    def _for_loading(cls, model: nn.Module, peft_config: AdapterConfig, adapter_name: str) -> PeftModel:
        """A PeftModel for a saved adapter's config (pattern keys that match nothing warn, as in PEFT)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_model = AdapterModel(model, peft_config, adapter_name, loading=True)
        self.training = model.training
        return self

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
        prompt = self.base_model.prompt_adapter()
        if prompt is not None:
            return self._prompt_call("forward", prompt, adapter_names, args, kwargs)
        with self._rows(adapter_names, 1):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        # generate repeats each row for beams and returned sequences; the names follow their rows.
        prompt = self.base_model.prompt_adapter()
        if prompt is not None:
            return self._prompt_call("generate", prompt, adapter_names, args, kwargs)
        repeat = max(kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences") or 1)
        with self._rows(adapter_names, repeat):
            return self.base_model.model.generate(*args, **kwargs)

    def _prompt_call(self, what: str, prompt, adapter_names, args, kwargs):
        """forward / generate with a prompt-learning adapter active (`adapters.prompt`)."""
        from peftctl.adapters import prompt as prompt_lib

        config, encoder = prompt
        if adapter_names is not None:
            raise ValueError(f"adapter_names (a mixed batch) is not available for {config.peft_type} adapters")
        prompt_lib.check_ready(encoder, config)
        return getattr(prompt_lib, what)(self, config, encoder, args, kwargs)

    def prepended_tokens(self) -> int:
        """How many virtual tokens the active adapter puts before each sequence in the forward's
        output (prompt tuning, P-tuning: num_virtual_tokens; other methods, prefix tuning and an
        encoder-decoder, whose virtual tokens go to the encoder and its logits are the decoder's: 0)."""
        prompt = self.base_model.prompt_adapter()
        if prompt is None or prompt[0].method == "prefix_tuning" or prompt[0].num_transformer_submodules != 1:
            return 0
        return prompt[0].num_virtual_tokens

    def _rows(self, adapter_names: list[str] | None, repeat: int):
        if adapter_names is None:
            return contextlib.nullcontext()
        return self.base_model.batch_adapters([n for n in adapter_names for _ in range(repeat)])

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (inactive, frozen until `set_adapter`); its modules take the model's mode.
        The name must be a plain name (no path separator, no dot): it names the adapter's subfolder
        when saved."""
        _check_options(autocast_adapter_dtype)
        _check_task_type(self.base_model.model, peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several at once; they train unless `inference_mode`."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this context; afterwards every adapter layer is as it was
        before (so a nested `disable_adapter` leaves the outer one's layers disabled)."""
        layers = list(self.base_model.wrappers())
        before = [layer.disable_adapters for layer in layers]
        prompt_before = self.base_model.prompt_disabled
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            for layer, disabled in zip(layers, before, strict=True):
                layer.disable_adapters = disabled
            self.base_model.prompt_disabled = prompt_before

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
                             combination_type: str | None = None, svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter combining others, with PEFT's arguments for the method: LoRA's combination
        types (None: svd, PEFT's default) and options; IA3's weighted sum (combination_type None or
        "linear", no other option). Other methods' adapters do not combine: ValueError, as in PEFT."""
        self.base_model.add_weighted_adapter(
            adapters, weights, adapter_name, combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
            majority_sign_method=majority_sign_method)

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
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        state_dict: dict[str, Any] | None = None) -> None:
        """Write each adapter in PEFT's format (a non-default one in a subfolder of its name).

        `save_embedding_layers` (PEFT's option and default): "auto" also writes the input and output
        embedding matrices when the vocabulary differs from the base model's (the embeddings were
        resized: the adapter is useless without their new rows), or the adapted ones when an
        embedding layer is among target_modules, and warns that it does; True writes them always,
        False never. Each matrix is written with its bias, if it has one. `state_dict`: take the
        tensors from this state dict of the PeftModel (e.g. one gathered from sharded training)
        instead of the live parameters.
        `path_initial_model_for_weight_conversion`: the folder where this PiSSA / OLoRA adapter was
        saved right after its init; the adapter is then written as the equivalent plain LoRA of rank
        2r for the *original* base model (see `lora.init.as_plain_lora`), as PEFT does. Unlike PEFT,
        that folder is only read (PEFT rewrites its adapter_config.json).
        """
        if not safe_serialization:
            raise ValueError("peftctl writes adapter weights as safetensors only")
        if Path(save_directory).is_file():
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder")
        if not is_main_process:
            return
        names = selected_adapters or list(self.peft_config)
        for name in names:
            io.check_adapter_name(name)
        self.base_model._check_names(names)
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            initial = io.read_weights(path_initial_model_for_weight_conversion)
        for name in names:
            self.save_adapter(name, io.adapter_folder(save_directory, name), save_embedding_layers,
                              state_dict=state_dict, initial=initial,
                              initial_source=str(path_initial_model_for_weight_conversion))

    def adapter_tensors_to_save(self, adapter_name: str, save_embedding_layers: bool | str = "auto",
                                state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
        """Saved key -> tensor: what `save_pretrained` writes for one adapter (its weights, the base
        biases its `bias` option trains, modules_to_save copies, and the embedding matrices as
        `save_embedding_layers` decides), from the live model or from `state_dict`."""
        self.base_model._check_names([adapter_name])
        return _adapter_tensors(self, adapter_name, state_dict, save_embedding_layers)

    def save_adapter(self, adapter_name: str, folder: str | os.PathLike, save_embedding_layers: bool | str = "auto",
                     state_dict: dict[str, Any] | None = None, initial: dict[str, Any] | None = None,
                     initial_source: str = "initial adapter", tensors: dict[str, Any] | None = None) -> None:
        """Write one adapter at the root of `folder`, whatever its name (a peftctl addition): the one
        way an adapter folder is written (`save_pretrained`, checkpoints and runs, FSDP included).
        `initial`: the tensors of the adapter right after a PiSSA / OLoRA init, to write it as the
        equivalent plain LoRA (see `save_pretrained`). `tensors`: what `adapter_tensors_to_save`
        gives, gathered elsewhere (full tensors of a sharded model), instead of the live ones."""
        self.base_model._check_names([adapter_name])
        config = self.saved_config(adapter_name)
        if tensors is None:
            tensors = _adapter_tensors(self, adapter_name, state_dict, save_embedding_layers)
        if initial is not None:
            from peftctl.adapters.lora.init import as_plain_lora

            if config.method != "lora":
                raise ValueError(f"path_initial_model_for_weight_conversion converts LoRA adapters; {adapter_name!r} "
                                 f"is {config.method}")
            tensors, config = as_plain_lora(tensors, initial, config, initial_source)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        io.save_tensors(tensors, folder)
        config.save_pretrained(folder)

    def saved_config(self, adapter_name: str) -> AdapterConfig:
        """The adapter's config as adapter_config.json records it: inference_mode on, the base model
        named, and rank / alpha patterns written so that PEFT, which takes the first matching key in
        the file's order, resolves every module as peftctl does (`matching.peft_safe_patterns`)."""
        model = self.base_model.model
        config = self.peft_config[adapter_name]
        names = [n for n, m in io.wrappers(model) if isinstance(m, AdapterLayer) and adapter_name in m.adapter_names]
        update: dict[str, Any] = {"inference_mode": True, **peft_safe_patterns(config, names)}
        if config.base_model_name_or_path is None:
            update["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
        return config.model_copy(update=update)

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> None:
        """Not implemented; defined so that the call does not reach the base model's `push_to_hub`
        (which would upload the whole base model). Save with `save_pretrained` and upload the folder
        (`huggingface_hub.upload_folder`)."""
        raise NotImplementedError(
            "peftctl does not upload adapters: save_pretrained(folder), then upload the folder "
            "(huggingface_hub.upload_folder or `hf upload`)")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None, *,
                        subfolder: str | None = None, revision: str | None = None, cache_dir: str | None = None,
                        token: str | bool | None = None, force_download: bool = False, local_files_only: bool = False,
                        torch_device: str | None = None, allow_pickle: bool = False) -> PeftModel:
        """`model` with the adapter saved at `model_id` (a folder, or a hub id when the hub is reachable).

        PEFT's keywords: `subfolder`, `revision`, `cache_dir`, `token`, `force_download`,
        `local_files_only` find the files; `key_mapping` ({regex: replacement}, applied to each saved
        key without its `base_model.model.` prefix; default: the model's
        `_checkpoint_conversion_mapping`) renames keys; `torch_device` is where PEFT first reads the
        tensors (they end on their layers' devices either way). `allow_pickle` (peftctl's) lets an
        `adapter_model.bin` load. `adapter_name` must be a plain name (it names a subfolder on save).
        """
        _check_options(autocast_adapter_dtype, ephemeral_gpu_offload)
        io.check_adapter_name(adapter_name)
        folder = adapter_dir(model_id, subfolder, revision, cache_dir=cache_dir, token=token,
                             force_download=force_download, local_files_only=local_files_only)
        config = (config or AdapterConfig.from_pretrained(folder)).model_copy(update={"inference_mode": not is_trainable})
        peft_model = cls._for_loading(model, config, adapter_name)
        tensors = _mapped_keys(io.read_weights(folder, allow_pickle), key_mapping, model)
        peft_model.base_model.load_adapter_tensors(adapter_name, tensors, str(folder))
        peft_model.set_adapter(adapter_name, inference_mode=not is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, *, subfolder: str | None = None,
                     revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
                     force_download: bool = False, local_files_only: bool = False, allow_pickle: bool = False) -> None:
        """Add the adapter saved at `model_id` under `adapter_name` (not activated: see `set_adapter`).
        Keywords as in `from_pretrained`."""
        _check_options(autocast_adapter_dtype, ephemeral_gpu_offload)
        io.check_adapter_name(adapter_name)
        folder = adapter_dir(model_id, subfolder, revision, cache_dir=cache_dir, token=token,
                             force_download=force_download, local_files_only=local_files_only)
        config = AdapterConfig.from_pretrained(folder).model_copy(update={"inference_mode": not is_trainable})
        self.base_model.inject_adapter(adapter_name, config, loading=True)
        try:
            tensors = _mapped_keys(io.read_weights(folder, allow_pickle), key_mapping, self.base_model.model)
            self.base_model.load_adapter_tensors(adapter_name, tensors, str(folder))
        except Exception:
            self.base_model.delete_adapter(adapter_name)  # no half-loaded adapter stays behind
            raise
        if not is_trainable:
            self.eval()


def _adapter_tensors(model: PeftModel, adapter_name: str, state_dict: dict[str, Any] | None,
                     save_embedding_layers: bool | str) -> dict[str, Any]:
    """Saved key -> tensor for one adapter, from the live model or from `state_dict` (a state dict
    of the PeftModel, keyed as `model.state_dict()` is); the embedding layers as
    `save_embedding_layers` decides (`io.embeddings_to_save`, warning when "auto" adds them)."""
    config = model.peft_config[adapter_name]
    inner = model.base_model.model
    live = model.base_model.adapter_tensors(adapter_name)
    base_vocab = None
    if save_embedding_layers == "auto":
        base_vocab = model.base_model.base_vocab_size
        if base_vocab is None:
            base_vocab = io.base_vocab_size(config.base_model_name_or_path or getattr(inner, "name_or_path", None),
                                            config.revision)
    names, why = io.embeddings_to_save(inner, config, save_embedding_layers, base_vocab)
    if why:
        warnings.warn(f"save_embedding_layers='auto': {why}", stacklevel=4)
    if names:
        live.update(io.embedding_tensors(inner, names))
    if state_dict is None:
        return live
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    missing = [k for k, t in live.items() if names.get(id(t)) not in state_dict]
    if missing:
        raise ValueError(f"state_dict has no tensor for {missing[0]} (as {names.get(id(live[missing[0]]))})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return {k: state_dict[names[id(t)]] for k, t in live.items()}


def _mapped_keys(tensors: dict[str, Any], key_mapping: dict[str, str] | None, model: nn.Module) -> dict[str, Any]:
    """PEFT's `key_mapping`: each key, without its `base_model.model.` (or `base_model.`) prefix,
    renamed by the first {regex: replacement} that matches it. None: the model's
    `_checkpoint_conversion_mapping` (transformers' renames of an architecture's modules)."""
    import re

    if key_mapping is None:
        key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    if not key_mapping:
        return tensors
    out = {}
    for key, t in tensors.items():
        prefix = next((p for p in (io.PREFIX, "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping: saved key {key!r} does not start with {io.PREFIX!r}")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        out[prefix + rest] = t
    return out


def adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None, *,
                cache_dir: str | None = None, token: str | bool | None = None, force_download: bool = False,
                local_files_only: bool = False) -> Path:
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
        local = snapshot_download(str(model_id), revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                                  token=token, force_download=force_download, local_files_only=local_files_only)
    except Exception as e:  # offline, unknown repo, no access: say what was asked for
        raise ValueError(f"no adapter folder {model_id!r} here, and the hub could not provide it: {e}") from None
    return Path(local) / subfolder if subfolder else Path(local)


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap `model` with a new adapter, trainable unless the config says `inference_mode`.
    `revision`: the base model's revision, recorded in the adapter's config (PEFT's keyword)."""
    _check_options(autocast_adapter_dtype, mixed=mixed)
    update: dict[str, Any] = {}
    if peft_config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        update["base_model_name_or_path"] = model.name_or_path
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                          f"overwriting with revision {revision}", UserWarning, stacklevel=2)
        update["revision"] = revision
    return PeftModel(model, peft_config.model_copy(update=update) if update else peft_config, adapter_name)


# ---- AutoPeftModel: base model and adapter from the adapter folder alone ------------------------

_AUTO_CLASSES = {
    TaskType.CAUSAL_LM.value: "AutoModelForCausalLM",
    TaskType.SEQ_CLS.value: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS.value: "AutoModelForTokenClassification",
    TaskType.SEQ_2_SEQ_LM.value: "AutoModelForSeq2SeqLM",
    TaskType.QUESTION_ANS.value: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION.value: "AutoModel",
}
# Keywords of AutoPeftModel.from_pretrained that find the adapter's files as well as the base model's.
_HUB_KEYWORDS = ("cache_dir", "token", "force_download", "local_files_only")


class AutoPeftModel:
    """Load the base model named in adapter_config.json (`base_model_name_or_path`) and the adapter."""

    task_type: str | None = None  # None: the adapter config's task_type decides

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        revision: str | None = None, import_allowlist: list[str] | None = None,
                        **kwargs: Any) -> PeftModel:
        """`kwargs` go to the base model's `from_pretrained` (dtype, device_map, ...), which raises
        TypeError for a name it does not know; `subfolder` and the hub keywords (cache_dir, token,
        force_download, local_files_only) also find the adapter. `import_allowlist` (PEFT's) limits
        the libraries an adapter's `auto_mapping` may import; peftctl imports none."""
        hub = {k: kwargs[k] for k in _HUB_KEYWORDS if k in kwargs}
        folder = adapter_dir(pretrained_model_name_or_path, kwargs.pop("subfolder", None), revision, **hub)
        peft_config = config or AdapterConfig.from_pretrained(folder)
        base_ref = peft_config.base_model_name_or_path
        if not base_ref:
            raise ValueError(f"{folder / CONFIG_NAME} names no base model (base_model_name_or_path)")
        task = cls.task_type or peft_config.task_type or TaskType.CAUSAL_LM.value
        base = _load_base(base_ref, _AUTO_CLASSES[task], peft_config.revision, kwargs)
        return PeftModel.from_pretrained(base, folder, adapter_name, is_trainable, config=peft_config)


def _load_base(base_ref: str, auto_class: str, revision: str | None, kwargs: dict[str, Any]) -> nn.Module:
    from peftctl import models

    alias = models.builtin_for_hub_id(base_ref)
    if alias and models.BUILTIN_MODELS[alias].gguf_file is None:
        # A built-in shipped as a plain folder (all-minilm-l6-v2): its package's folder when installed
        # (offline), else the hub id as recorded; either with the task's class, like any other model.
        from peftctl.errors import InputError

        with contextlib.suppress(InputError):
            base_ref = str(models.find_builtin_file(alias))
    elif base_ref.endswith(".gguf") or alias:
        # A base model peftctl read from a GGUF file (the built-in model is recorded by its original
        # hub id, and means that built-in here): its own loader converts it.
        from peftctl.sections import ModelSection

        unknown = sorted(set(kwargs) - {"dtype"})
        if unknown:
            raise TypeError(f"a base model read from a GGUF file takes only dtype here, not {', '.join(unknown)}")
        name = models.builtin_for_hub_id(base_ref) or base_ref
        return models.load_model(ModelSection(name_or_path=name), dtype=kwargs.get("dtype"))
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


def get_peft_model_state_dict(model: PeftModel, state_dict: dict[str, Any] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, Any]:
    """One adapter's tensors under the keys PEFT saves them with (what `save_pretrained` writes).

    `state_dict`: read them from this state dict of the PeftModel instead of the live parameters;
    `unwrap_compiled`: `model` may be a `torch.compile`d PeftModel; `save_embedding_layers`: as in
    `save_pretrained` ("auto" by default, as in PEFT).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    return {k: t.detach() for k, t in _adapter_tensors(model, adapter_name, state_dict, save_embedding_layers).items()}


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, Any],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> None:
    """Load tensors saved under PEFT's keys into an existing adapter (every key must fit).
    `ignore_mismatched_sizes=True` (PEFT skips tensors of another shape) is refused: peftctl loads
    every tensor or none."""
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: peftctl loads every tensor of an adapter or none")
    model.base_model._check_names([adapter_name])
    model.base_model.load_adapter_tensors(adapter_name, peft_model_state_dict, "state dict")
