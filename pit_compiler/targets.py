"""Which TVM target serves a torch device."""

from __future__ import annotations

import functools

import torch
from tvm.target import Target

from pit_compiler.ir import BackendUnavailable


@functools.lru_cache(maxsize=None)
def _target(kind: str, index: int | None) -> Target:
    if kind == "cpu":
        return Target("llvm")
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return Target({"kind": "cuda", "arch": f"sm_{major}{minor}"})
    raise BackendUnavailable(
        f"PIT runs on 'cpu' (TVM llvm) and 'cuda' (TVM cuda) tensors, got a tensor on {kind!r}; "
        "move the inputs with .cpu() or .cuda()"
    )


def target_for(device: torch.device) -> Target:
    """The TVM target that compiles kernels for tensors on ``device``."""
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None
    )
    return _target(device.type, index)


def mma_sync_dtypes() -> tuple[str, ...]:
    """Input dtypes the ``mma.sync`` tensor-core tiles take at run time: float16.

    Their bfloat16 tiles build (``schedules.mma_intrinsics``), but TVM 0.27's CUDA codegen
    writes ``ldmatrix.trans`` of bfloat16 (B's fragments) as an element-wise copy with wrong
    offsets, which faulted (illegal address) on an H200. bfloat16 takes Hopper's warpgroup tile
    where that serves (it reads B by descriptor: no ``ldmatrix``), else the SIMT kernels."""
    return ("float16",)
