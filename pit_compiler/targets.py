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


# bfloat16 tensor-core tiles build for sm_90 and pass every CPU check, but have not yet run on a
# GPU: they stay off unless asked for, so bfloat16 products keep the GPU-checked kernels.
BF16_TENSOR_CORES_ENV = "PIT_BF16_TENSOR_CORES"


def tensor_core_dtypes() -> tuple[str, ...]:
    """Input dtypes the tensor-core tiles take: float16, and bfloat16 with
    ``$PIT_BF16_TENSOR_CORES=1`` (its gpu tests set it)."""
    return ("float16", "bfloat16") if os.environ.get(BF16_TENSOR_CORES_ENV) == "1" else ("float16",)
