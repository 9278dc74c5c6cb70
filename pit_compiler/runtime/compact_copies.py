"""Compact copies of transposed operands, kept while their source is unchanged.

An ``nn.Linear`` weight reaches a matmul as ``W.t()``, B stored ``(n, k)``; Hopper's warpgroup
tile reads B stored ``(k, n)``, and ``(n, k)`` only where ``codegen.warpgroup.READS_B_AS_STORED``
allows it (not yet run on a GPU) and chunks of k are multiples of 8. Copying the weight on every call would cost a pass over
it per call; instead one copy is kept per source tensor and reused while the source lives
and its version counter (bumped by every in-place write through autograd-visible tensors:
optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``) has not moved. A write
through ``.data`` bypasses the counter: call :meth:`CompactCopies.clear` after one.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch


class _Copy(NamedTuple):
    source: weakref.ref  # the tensor the view is of (its base), to tell it from a later one at the same address
    version: int
    copy: torch.Tensor


class CompactCopies:
    """``view.contiguous()`` for a transposed view, kept per view (least recently used first
    out beyond ``limit_bytes``). Not kept, only made, where the source cannot be followed:
    inference tensors (no version counter) and while a CUDA graph is captured (the graph
    must copy on every replay to see later writes)."""

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes!r}")
        self.limit_bytes = limit_bytes
        self._copies: OrderedDict[tuple, _Copy] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, view: torch.Tensor) -> torch.Tensor:
        """A compact tensor equal to ``view``: the kept copy where it is still current."""
        source = view._base if view._base is not None else view
        if view.is_inference() or (view.is_cuda and torch.cuda.is_current_stream_capturing()):
            return view.contiguous()
        key = (view.data_ptr(), tuple(view.shape), tuple(view.stride()), view.dtype, view.device)
        with self._lock:
            kept = self._copies.get(key)
            if kept is not None and kept.source() is source and kept.version == view._version:
                self._copies.move_to_end(key)
                return kept.copy
        copy = view.contiguous()
        self._keep(key, _Copy(weakref.ref(source), view._version, copy))
        return copy

    def clear(self) -> None:
        """Forget every copy (after writing a source through ``.data``)."""
        with self._lock:
            self._copies.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._copies)

    def _keep(self, key: tuple, entry: _Copy) -> None:
        size = _nbytes(entry.copy)
        if size > self.limit_bytes:
            return
        with self._lock:
            stale = [k for k, c in self._copies.items() if k == key or c.source() is None]
            for old in stale:
                self._bytes -= _nbytes(self._copies.pop(old).copy)
            while self._copies and self._bytes + size > self.limit_bytes:
                self._bytes -= _nbytes(self._copies.popitem(last=False)[1].copy)
            self._copies[key] = entry
            self._bytes += size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
