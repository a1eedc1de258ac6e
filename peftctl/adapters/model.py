"""`AdapterModel`: injects a method's layers into a model (a transformers model or any other
`nn.Module`) and manages its adapters (add / set / delete / disable, mixed batches, merge / unmerge /
unload, trainability).

`PeftModel` (in `peft_model.py`) is PEFT's public API on top; the nesting mirrors PEFT's,
`PeftModel.base_model.model` is the base model, so parameter names and saved keys
(`base_model.model.<module path>...`) are PEFT's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from peftctl.adapters import io
from peftctl.adapters.config import AdapterConfig
from peftctl.adapters.hooks import HookSet, TrainingHooks
from peftctl.adapters.layer import AdapterLayer
from peftctl.adapters.matching import (
    ALL_LINEAR,
    check_patterns,
    find_modules_to_save,
    find_targets,
    modules_to_save_names,
    resolve_targets,
)
from peftctl.adapters.modules_to_save import ModulesToSaveWrapper
from peftctl.adapters.registry import layer_module, optional
from peftctl.bnb import keep_plain_layout

BASE = "__base__"  # the name that means "no adapter" in a mixed batch
# add_weighted_adapter's options at PEFT's defaults (None: the method's default combination type).
_COMBINE_DEFAULTS = {"combination_type": None, "svd_rank": None, "svd_clamp": None, "svd_full_matrices": True,
                     "svd_driver": None, "density": None, "majority_sign_method": "total"}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class AdapterModel(nn.Module):
    """Holds the base model (any `nn.Module`) with adapter layers injected into it."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default", loading: bool = False):
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper is in the model's mode (train / eval)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        # The base model's vocabulary size, when the caller knows it (the CLI records the loaded
        # base's); None: read from the config's base_model_name_or_path when saving (see io.embeddings_to_save).
        self.base_vocab_size: int | None = None
        self._active_trainable = True  # whether the active adapters train (set_adapter's inference_mode)
        self.prompt_disabled = False  # a prompt-learning adapter switched off (disable_adapter)
        self._training_hooks: dict[str, TrainingHooks] = {}  # what methods add to training (hooks.py)
        # Per adapter, what its method keeps outside the layers (made by the method's `before_inject`).
        self.method_state = nn.ModuleDict().train(self.training)
        keep_plain_layout(model)  # evaluating a 4-bit base must not change how it trains (peftctl.bnb)
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject_adapter(adapter_name, config, loading=loading)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- adding and removing ------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: AdapterConfig, loading: bool = False) -> list[str]:
        """Add an adapter's layers to the model. `loading`: the config comes from a saved adapter
        (rank / alpha pattern keys that match nothing then warn, as in PEFT, instead of raising)."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if adapter_name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model in mixed batches")
        methods = {c.method for c in self.peft_config.values()}
        if methods and config.method not in methods:
            raise ValueError(
                f"this model holds {', '.join(methods)} adapters; a {config.method} adapter cannot be added to it"
            )
        if config.is_prompt_learning:
            return self._inject_prompt(adapter_name, config, loading)
        trains_biases = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if trains_biases and getattr(config, "bias", "none") != "none":
            # PEFT's rule: the base model's biases are shared by every adapter, so one adapter at most
            # may train (and save) them.
            raise ValueError(
                f"adapter {trains_biases[0]!r} already trains the base model's biases (bias="
                f"{self.peft_config[trains_biases[0]].bias!r}); only one adapter may, so give {adapter_name!r} bias='none'"
            )
        # Defaults that depend on the model type (IA3's feedforward_modules), recorded with the adapter.
        config = config.with_model_defaults(getattr(getattr(self.model, "config", None), "model_type", None))
        layers = layer_module(config.method)
        names = find_targets(self.model, config)
        check_patterns(config, names, self.model, loading=loading)
        saved = find_modules_to_save(self.model, config)
        for name in names:
            if isinstance(self.model.get_submodule(name), ModulesToSaveWrapper):
                raise ValueError(f"module {name} is trained in full by another adapter (modules_to_save)")
        done: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            # A method's state outside the layers, made before them (VeRA's shared projections, sized
            # for the largest target), is handed to each of its layers as `state`.
            before = optional(config.method, "before_inject")
            state = before(self, adapter_name, config, names) if before else None
            extra = {}
            if state is not None:
                self.method_state[adapter_name] = state.train(self.training)  # the model's mode
                extra = {"state": state}
            for name in names:
                parent, attr = _parent(self.model, name)
                module = getattr(parent, attr)
                done.append((parent, attr, module))
                if isinstance(module, AdapterLayer):
                    module.update_layer(adapter_name, config, module_name=name, **extra)
                else:
                    setattr(parent, attr, layers.dispatch(module, adapter_name, config, name, **extra))
        except Exception:
            # A target that cannot take the adapter: leave the model's structure as it was.
            for parent, attr, module in done:
                setattr(parent, attr, module)
                if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names:
                    module.delete_adapter(adapter_name)
            if adapter_name in self.method_state:
                del self.method_state[adapter_name]
            raise
        for name in saved:
            parent, attr = _parent(self.model, name)
            module = getattr(parent, attr)
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))
        self.peft_config[adapter_name] = self._recorded_config(config, names)
        make_hooks = optional(config.method, "training_hooks")
        hooks = make_hooks(self, adapter_name, self.peft_config[adapter_name]) if make_hooks else None
        if hooks is not None:
            self._training_hooks[adapter_name] = hooks
        self._apply_trainability()
        return names

    def _inject_prompt(self, adapter_name: str, config: AdapterConfig, loading: bool) -> list[str]:
        """A prompt-learning adapter: no layer changes; its encoder (`adapters.prompt`) is kept in
        `method_state`, with the config's model dimensions filled in from the model, as PEFT records them.
        A saved adapter's encoder is not initialised (its weights are loaded next)."""
        from peftctl.adapters import prompt

        config = prompt.with_model_dims(config, self.model)
        init = config
        if loading and config.method == "prompt_tuning":
            init = config.model_copy(update={"inference_mode": True})  # the file's weights replace any init
        encoder = prompt.make_encoder(self.model, init)
        self.method_state[adapter_name] = encoder.train(self.training)
        self.peft_config[adapter_name] = config
        hooks = prompt.training_hooks(self, adapter_name, config)
        if hooks is not None:
            self._training_hooks[adapter_name] = hooks
        self._apply_trainability()
        return []

    def prompt_adapter(self):
        """(config, encoder) of the active prompt-learning adapter, or None (another method, or the
        adapters disabled)."""
        if not self.active_adapters or self.prompt_disabled:
            return None
        config = self.peft_config[self.active_adapters[0]]
        if not config.is_prompt_learning:
            return None
        return config, self.method_state[self.active_adapters[0]]

    def _recorded_config(self, config: AdapterConfig, names: list[str]) -> AdapterConfig:
        """The config as saved: what was actually built, in PEFT's terms."""
        update = {}
        saved = modules_to_save_names(config)
        if saved != config.modules_to_save:
            update["modules_to_save"] = saved  # with the task type's head, as PEFT records it
        if not config.target_modules:
            # The model type's default targets, written out: readers of the file need the names.
            update["target_modules"] = resolve_targets(self.model, config)
        elif config.target_modules == ALL_LINEAR:
            # Saved as the explicit module list, as PEFT does: readers such as vLLM match names.
            update["target_modules"] = sorted(names)
        if "fan_in_fan_out" in type(config).model_fields:
            # PEFT records fan_in_fan_out=True when it adapts transformers' Conv1D (GPT-2).
            transposed = any(getattr(self.model.get_submodule(n), "fan_in_fan_out", False) for n in names)
            update["fan_in_fan_out"] = transposed
        return (config.model_copy(update=update) if update else config).recorded(names)

    def adapter_layers(self) -> Iterator[AdapterLayer]:
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                yield module

    def wrappers(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for _, module in io.wrappers(self.model):
            yield module

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names([adapter_name])
        for module in self.wrappers():
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._training_hooks.pop(adapter_name, None)
        if adapter_name in self.method_state:
            del self.method_state[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._apply_trainability()

    # ---- an adapter's tensors, as saved --------------------------------------------------------------
    def method_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Saved key -> live tensor of what the adapter's method keeps outside the layers (its
        `model_tensors` hook, e.g. VeRA's shared projections under `base_model.vera_A`); none for most."""
        fn = optional(self.peft_config[adapter_name].method, "model_tensors")
        return fn(self, adapter_name) if fn else {}

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Saved key -> live tensor of everything one adapter saves but the embedding matrices: its
        layers' tensors, its method's model-level tensors, modules_to_save copies and trained biases."""
        self._check_names([adapter_name])
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        return io.adapter_tensors(self.model, adapter_name, bias, self.method_tensors(adapter_name))

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy saved tensors (PEFT's keys) into the adapter; every key must fit both ways (`io.load_weights`).
        A method's `before_load` hook may first fit its state outside the layers to the file's tensors."""
        before = optional(self.peft_config[adapter_name].method, "before_load")
        if before:
            before(self, adapter_name, tensors)
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        io.load_weights(self.model, adapter_name, tensors, source, bias, self.method_tensors(adapter_name))

    def training_hooks(self) -> HookSet:
        """What the active adapters' methods contribute to the training loop (`hooks.py`): false
        when nothing (LoRA, IA3)."""
        return HookSet({n: self._training_hooks[n] for n in self.active_adapters if n in self._training_hooks})

    def _check_names(self, names: list[str]) -> None:
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; adapters: {', '.join(self.peft_config) or 'none'}")

    # ---- activation and trainability ----------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters the active ones; they train unless `inference_mode` (PEFT's rule)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if len(names) > 1 and any(self.peft_config[n].is_prompt_learning for n in names):
            raise ValueError("one prompt-learning adapter is active at a time (PEFT's rule too)")
        self.active_adapters = names
        self._apply_trainability(not inference_mode)

    def _apply_trainability(self, trainable: bool | None = None) -> None:
        """Active adapters (and their modules_to_save copies and biases) train; everything else is frozen."""
        if trainable is None:
            trainable = self._active_trainable
        self._active_trainable = trainable
        for name, config in self.peft_config.items():
            if config.is_prompt_learning:
                self.method_state[name].requires_grad_(trainable and name in self.active_adapters)
        for module in self.wrappers():
            module.set_adapter(self.active_adapters, trainable=trainable)
        for mode in {getattr(c, "bias", "none") for c in self.peft_config.values()}:
            for p in io.trained_biases(self.model, mode).values():
                p.requires_grad_(False)
        for name in self.active_adapters:
            mode = getattr(self.peft_config[name], "bias", "none")
            for p in io.trained_biases(self.model, mode).values():
                p.requires_grad_(trainable)

    def _set_enabled(self, enabled: bool) -> None:
        self.prompt_disabled = not enabled
        for module in self.wrappers():
            module.disable_adapters = not enabled

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        self._set_enabled(False)

    @contextlib.contextmanager
    def batch_adapters(self, adapter_names: list[str]):
        """Inside this context each row of the batch uses its own adapter (`__base__`: none)."""
        if self.training:
            raise ValueError("adapter_names (a mixed batch) is for inference; call model.eval() first")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names holds unknown adapters: {', '.join(unknown)}")
        unsupported = sorted({type(c).peft_type for c in self.peft_config.values() if not type(c).mixed_batches})
        if unsupported:
            raise ValueError(f"adapter_names (a mixed batch) is not available for {', '.join(unsupported)} adapters "
                             "(PEFT does not mix them per row either); run one adapter at a time (set_adapter)")
        modules = list(self.wrappers())
        before = [module.batch_adapter_names for module in modules]
        for module in modules:
            module.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:  # as they were (a nested block leaves the outer one's names)
            for module, names in zip(modules, before, strict=True):
                module.batch_adapter_names = names

    # ---- merging ------------------------------------------------------------------------------
    def _refuse_prompt_merge(self, names: list[str]) -> None:
        prompts = sorted({self.peft_config[n].peft_type for n in names if self.peft_config[n].is_prompt_learning})
        if prompts:
            raise ValueError(f"{', '.join(prompts)} adapters cannot be merged: they add virtual tokens to the model's "
                             "input (or keys and values before it), not a change to its weights; use the base model "
                             "with the adapter (export --format peft)")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names or self.active_adapters
        self._check_names(names)
        self._refuse_prompt_merge(names)
        for layer in self.adapter_layers():
            if any(n in layer.adapter_names and n not in layer.merged_adapters for n in names):
                _untie_before_merge(self.model, layer)
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        for name, module in list(io.wrappers(self.model)):
            parent, attr = _parent(self.model, name)
            if isinstance(module, AdapterLayer):
                setattr(parent, attr, module.get_base_layer())
            else:  # modules_to_save: the trained copy when merging, the original when unloading
                setattr(parent, attr, module.active_module if merge else module.original_module)
        if merge:
            _untie_split_embeddings(self.model)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active adapters (or `adapter_names`) into the base weights; return the plain model."""
        return self._unwrap(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging: the base model as it was."""
        return self._unwrap(False)

    # ---- adapter arithmetic ---------------------------------------------------------------------
    def _lora_only(self, what: str) -> None:
        methods = {c.method for c in self.peft_config.values()}
        if methods != {"lora"}:
            kinds = ", ".join(sorted(type(c).peft_type for c in self.peft_config.values()))
            raise ValueError(f"{what} is defined for LoRA adapters only; this model holds {kinds} adapters")

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str | None = None, svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter combining `adapters`: the method's own `add_weighted_adapter` (LoRA's in
        `lora/combine.py`, IA3's weighted sum in `ia3/layer.py`) with PEFT's arguments for it;
        `combination_type` None: the method's default (LoRA: svd, as PEFT). Only the options given (not
        at PEFT's default) reach the method, so one that takes none can refuse them. ValueError for a
        method whose adapters do not combine (in PEFT: all but LoRA and IA3)."""
        methods = {c.method for c in self.peft_config.values()}
        combine = optional(next(iter(methods)), "add_weighted_adapter") if len(methods) == 1 else None
        if combine is None:
            kinds = ", ".join(sorted(type(c).peft_type for c in self.peft_config.values()))
            raise ValueError(f"add_weighted_adapter is not defined for {kinds} adapters (PEFT defines it for LoRA "
                             "and IA3 only)")
        given = {"combination_type": combination_type, "svd_rank": svd_rank, "svd_clamp": svd_clamp,
                 "svd_full_matrices": svd_full_matrices, "svd_driver": svd_driver, "density": density,
                 "majority_sign_method": majority_sign_method}
        options = {k: v for k, v in given.items() if v != _COMBINE_DEFAULTS[k]}
        combine(self, adapters, weights, adapter_name, **options)

    def resize_adapter_rank(self, adapter_name: str, r: int) -> dict:
        from peftctl.adapters.lora.resize import resize_rank

        self._lora_only("resize_adapter_rank")
        return resize_rank(self, adapter_name, r)


def _untie_before_merge(model: nn.Module, layer: AdapterLayer) -> None:
    """Merging into a weight that another module shares (tied embeddings) would change that module
    too; give the others their own copy first, and record that the weights are no longer tied."""
    weight = layer.get_base_layer().weight
    owners = [
        (module, key) for module in model.modules() if module is not layer.get_base_layer()
        for key, p in module._parameters.items() if p is weight
    ]
    if not owners:
        return
    for module, key in owners:
        setattr(module, key, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
    _record_untied(model)


def _record_untied(model: nn.Module) -> None:
    """Say in the model's config (and its text config) that the word embeddings are not tied, so that
    nothing re-ties them (`tie_weights()`, `resize_token_embeddings`, saving and loading)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5's record of what it tied
    if isinstance(tied, dict):
        params = dict(model.named_parameters(remove_duplicate=False))
        for target, source in list(tied.items()):
            if target in params and source in params and params[target] is not params[source]:
                tied.pop(target)


def _untie_split_embeddings(model: nn.Module) -> None:
    """After a merge: a config that ties the word embeddings while the input and output embeddings
    hold different weights (a trained `modules_to_save` copy of one of them took its place) is
    corrected, so the trained copy is not overwritten by a later re-tie."""
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if inp is None or out is None:
        return
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: None)()
    tied = any(getattr(c, "tie_word_embeddings", False) for c in (config, text) if c is not None)
    if tied and getattr(inp, "weight", None) is not getattr(out, "weight", None):
        _record_untied(model)
