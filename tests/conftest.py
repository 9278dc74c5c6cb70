"""Shared test setup: a memory-only kernel cache, and the GPU probe behind the ``gpu`` mark."""

from __future__ import annotations

import functools

import pytest
import torch

import pit_compiler as pit
from pit_compiler.runtime import KernelCache


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    """Memoized, never raises: a broken driver reads as 'no GPU'."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def pit_kernels_at_every_density(monkeypatch):
    """Kernel tests check PIT's kernels at 0 % sparsity too, where a GPU call would run dense
    cuBLAS instead; the tests of that fallback turn it back on."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "DENSE_FALLBACK", False)


@pytest.fixture(autouse=True)
def fresh_call_caches():
    """Tests replace the functions that route a call (the target, the tensor-core fits): each
    starts from no kept routes, detections or pruned-weight choices, and leaves none behind."""
    from pit_compiler import ops

    ops.clear_call_caches()
    yield
    ops.clear_call_caches()


@pytest.fixture(autouse=True, scope="session")
def memory_kernel_cache():
    """Tests build into memory; tests of the disk cache install their own."""
    pit.set_kernel_cache(KernelCache(None))
    yield
    pit.set_kernel_cache(None)


@pytest.fixture
def reduced_precision_reductions():
    """``allow(dtype, allowed)`` sets PyTorch's switch for reduced-precision reductions of
    ``dtype`` products; each switch is put back after the test."""
    from pit_compiler.ops import REDUCED_PRECISION_FLAGS

    matmul = torch.backends.cuda.matmul
    before = {flag: getattr(matmul, flag) for flag in REDUCED_PRECISION_FLAGS.values()}

    def allow(dtype: torch.dtype, allowed: bool) -> None:
        setattr(matmul, REDUCED_PRECISION_FLAGS[dtype], allowed)

    yield allow
    for flag, value in before.items():
        setattr(matmul, flag, value)
