"""Compiled PIT kernels on demand: generate, schedule, build once, then serve from the cache."""

from __future__ import annotations

import functools

from tvm.target import Target

from pit_compiler.ir import PITPlan
from pit_compiler.runtime.cache import KernelCache
from pit_compiler.schedules import template_for
from pit_compiler.schedules.detection import DetectionThreads

from .build import compile_primfunc, default_knobs, kernel_key
from .detect import build_detect
from .pit_matmul import build_pit_matmul


def matmul_kernel(plan: PITPlan, dtype: str, out_dtype: str, target: Target, cache: KernelCache, knobs=None):
    """The compiled ``main(a, b, c, cnt, idx)`` for ``plan``."""
    return cache.main(*_matmul_build(plan, dtype, out_dtype, target, knobs))


def matmul_module(plan: PITPlan, dtype: str, out_dtype: str, target: Target, cache: KernelCache, knobs=None):
    """The module holding :func:`matmul_kernel`'s ``main`` (the tuner times it with TVM's evaluator)."""
    return cache.get(*_matmul_build(plan, dtype, out_dtype, target, knobs))


def _matmul_build(plan: PITPlan, dtype: str, out_dtype: str, target: Target, knobs):
    """The cache key of a matmul kernel, and how to build it."""
    knobs = knobs if knobs is not None else default_knobs(target)
    atomic = target.kind.name == "cuda"
    dtypes = {"in": dtype, "out": out_dtype, "atomic": atomic}
    key = kernel_key("pit_matmul", plan.signature(), dtypes, target, knobs)

    def build():
        func = build_pit_matmul(plan, dtype, out_dtype, atomic=atomic)
        return compile_primfunc(func, target, knobs, what=f"{plan.form} matmul ({plan.signature()})")

    return key, build


def detect_kernel(
    order: tuple[str, ...],
    blocked: str,
    permuted: str,
    blocked_tile: int | None,
    permuted_tile: int,
    dtype: str,
    target: Target,
    cache: KernelCache,
    knobs=None,
    *,
    pack: int = 1,
    one_pass: bool = False,
):
    """The compiled ``main(s, cnt, idx)`` listing non-empty micro-tiles (see :mod:`.detect`).

    ``s`` holds ``dtype`` elements as integer words of ``pack``; tiles are in words. With
    ``one_pass`` (CUDA only) the listing is atomic and :class:`DetectionThreads` schedules it;
    otherwise the target's template runs the ascending two-stage listing.
    """
    return _detect_kernel(order, blocked, permuted, blocked_tile, permuted_tile, dtype, target, cache, knobs, pack, one_pass)


# Every call looks its kernels up: keep the answer per arguments (the cache and the target
# compare by identity, and the cache keeps what it returned for good).
@functools.lru_cache(maxsize=1024)
def _detect_kernel(order, blocked, permuted, blocked_tile, permuted_tile, dtype, target, cache, knobs, pack, one_pass):
    atomic = one_pass and target.kind.name == "cuda"
    template = DetectionThreads() if atomic else template_for(target)
    knobs = knobs if knobs is not None else template.Knobs()
    signature = f"order={order} blocked={blocked}:{blocked_tile} permuted={permuted}:{permuted_tile} pack={pack}"
    key = kernel_key("detect", signature, {"in": dtype, "atomic": atomic}, target, knobs)

    def build():
        func = build_detect(order, blocked, permuted, blocked_tile, permuted_tile, dtype, atomic=atomic, pack=pack)
        return compile_primfunc(func, target, knobs, what=f"detection ({signature})", template=template)

    return cache.main(key, build)
