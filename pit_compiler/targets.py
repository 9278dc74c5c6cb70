"""Which TVM target serves a torch device."""

from __future__ import annotations

import functools
import os

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


# CUDA kernels that build (nvcc, sm_90) and pass every CPU check but have not yet run on a GPU:
# they stay off unless asked for, so a GPU user gets only kernels the gpu test suite has passed.
UNVERIFIED_CUDA_ENV = "PIT_UNVERIFIED_CUDA_KERNELS"


def unverified_cuda_kernels() -> bool:
    """Whether ``$PIT_UNVERIFIED_CUDA_KERNELS=1`` opts in to the not yet GPU-checked CUDA kernels
    (the tensor-core reduce tile and the one-pass detection); the gpu tests of those kernels set it."""
    return os.environ.get(UNVERIFIED_CUDA_ENV) == "1"
