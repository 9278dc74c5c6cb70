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


@pytest.fixture(autouse=True, scope="session")
def memory_kernel_cache():
    """Tests build into memory; tests of the disk cache install their own."""
    pit.set_kernel_cache(KernelCache(None))
    yield
    pit.set_kernel_cache(None)
