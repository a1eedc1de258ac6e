"""Gradient checkpointing whose kept layer inputs wait in pinned host memory.

A checkpointed layer keeps only its input for the backward pass (the rest is recomputed). With
`OffloadedCheckpoint` as the layer's checkpoint function, that input is copied to pinned host
memory on a side stream as soon as the forward has produced it (the device copy is then freed),
and copied back on the same side stream when the backward needs it; when the backward takes one
layer's input back, it starts fetching the input of the layer before it, so the copy overlaps the
backward of the current layer. The compute stream waits only on events, never the host.

The kept tensors are those autograd saves through `torch.utils.checkpoint` (non-reentrant): the
layer's positional tensor arguments, i.e. transformers' hidden states (keyword arguments such as
the rotary embedding are kept by reference and are shared by all layers). Tensors under
`min_bytes` stay where they are. Host buffers are reused from step to step (one per checkpointed
layer). On a CPU device nothing moves unless `force` is set (tests use it to check the bookkeeping:
"host" copies are then clones).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils.checkpoint import checkpoint


class _Held:
    """A tensor that waits in host memory, and its trip back."""

    __slots__ = ("host", "device", "key", "fetched", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, key):
        self.host, self.device, self.key = host, device, key
        self.fetched: torch.Tensor | None = None
        self.ready = None


class OffloadedCheckpoint:
    """A drop-in for `torch.utils.checkpoint.checkpoint` (transformers' `_gradient_checkpointing_func`)
    that keeps the checkpointed inputs in pinned host memory (see the module docstring)."""

    def __init__(self, device: torch.device | str, min_bytes: int = 1 << 20, force: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # as tensors name it
        self.active = self.cuda or force
        self.min_bytes = min_bytes
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool: dict[tuple, list[torch.Tensor]] = {}
        self.held: list[weakref.ref] = []  # in the order the forward saved them
        self.copied_bytes = 0  # to host, since creation (for reports and tests)

    def __call__(self, function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if kwargs["use_reentrant"]:
            raise ValueError("OffloadedCheckpoint needs non-reentrant checkpointing (use_reentrant=False)")
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, **kwargs)

    # ---- copies -----------------------------------------------------------------------------
    def _side(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def pack(self, t: torch.Tensor):
        if not self.active or t.device != self.device or t.numel() * t.element_size() < self.min_bytes:
            return t
        key = (tuple(t.shape), t.dtype)
        free = self.pool.get(key)
        if free:
            host = free.pop()
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._side():
            host.copy_(t, non_blocking=self.cuda)
        if self.cuda:
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.copied_bytes += t.numel() * t.element_size()
        held = _Held(host, t.device, key)
        self.held = [r for r in self.held if r() is not None]  # drop graphs freed without a backward
        self.held.append(weakref.ref(held))
        return held

    def _fetch(self, held: _Held) -> None:
        with self._side():
            held.fetched = held.host.to(held.device, non_blocking=self.cuda) if self.cuda else held.host.clone()
            if self.cuda:
                held.ready = self.stream.record_event()

    def unpack(self, held):
        if isinstance(held, torch.Tensor):
            return held
        if held.fetched is None:
            self._fetch(held)
        tensor, held.fetched = held.fetched, None
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(held.ready)
            tensor.record_stream(main)
        self.pool.setdefault(held.key, []).append(held.host)  # reused by a later copy on the same stream
        self.held = [r for r in self.held if r() is not None and r() is not held]
        if self.held:  # the backward runs the layers in reverse: fetch the one before this one now
            before = self.held[-1]()
            if before is not None and before.fetched is None:
                self._fetch(before)
        return tensor

    @property
    def waiting(self) -> int:
        """Tensors held in host memory and not yet taken back by a backward."""
        return sum(1 for r in self.held if r() is not None)
