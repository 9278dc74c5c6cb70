"""The reduce-form PIT matmul on tensor cores: each row block of A sums over its own listed k chunks.

For micro-tiles of A spanning ``bm`` rows and ``bk`` columns (32x1, 32x32, 64x64 ...), detection
lists per row block ``q`` its non-empty k chunks: ``cnt[q]`` of them, ``idx[q, :cnt[q]]``. Row block
``q`` then has a condensed k axis whose position ``p`` is column ``idx[q, p // bk] * bk + p % bk``
of A and the same row of B; positions past ``cnt[q] * bk`` (or past K) read as zero.

That is a batched dense matmul, one batch per row block, which the tensor-core tile
(:mod:`..schedules.tensor_core_matmul`) computes with both gathers inlined into its
global->shared copies. Its k loop has a static bound (every chunk listed), and each thread block
stops after its own row block's positions (``pit.reduction_extent``), so the work follows the
density without reading anything back to the host. The output is dense: no scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

from tvm import te, tirx
from tvm.target import Target

from pit_compiler.ir import PITPlan
from pit_compiler.runtime.cache import KernelCache
from pit_compiler.schedules.mma_intrinsics import INPUT_DTYPES
from pit_compiler.schedules.tensor_core_matmul import (
    CAST_BLOCK,
    GATHER_B_BLOCK,
    GATHER_BLOCK,
    MMA,
    REDUCTION_EXTENT,
    VECTOR,
    TensorCoreMatmul,
    shared_memory_problem,
)

from .build import compile_primfunc, kept_per_plan, kernel_key

ROW_BLOCKS = (16, 32, 64, 128)  # micro-tile heights one thread block's rows cover exactly


def build_reduce_tile(K: int, N: int, bm: int, bk: int, block_k: int, out_dtype: str, dtype: str = "float16"):
    """``main(A, B, cnt, idx, C)``: ``C[q, r, n]`` = row ``q * bm + r`` of ``A @ B`` over row block
    ``q``'s listed chunks, for ``C`` of shape ``(Q, bm, N)``; rows past ``M`` (A's rows) are zero.

    The condensed k axis is padded to a multiple of ``block_k`` (the tile's k step).
    """
    Q = tirx.Var("Q", "int32")
    M = tirx.Var("M", "int32")
    chunks = math.ceil(K / bk)
    positions = math.ceil(chunks * bk / block_k) * block_k
    A = te.placeholder((M, K), dtype, name="A")
    B = te.placeholder((K, N), dtype, name="B")
    cnt = te.placeholder((Q,), "int32", name="cnt")
    idx = te.placeholder((Q, chunks), "int32", name="idx")
    zero = tirx.const(0, dtype)

    def column(q, p):
        # Positions past the listed chunks still read idx: clamp them into its row.
        return idx[q, tirx.min(p // bk, chunks - 1)] * bk + p % bk

    def listed(q, p):
        inside = p // bk < cnt[q]
        return inside if K % bk == 0 else tirx.all(inside, column(q, p) < K)

    gathered_a = te.compute(
        (Q, bm, positions),
        lambda q, r, p: tirx.if_then_else(
            tirx.all(listed(q, p), q * bm + r < M), A[q * bm + r, column(q, p)], zero
        ),
        name=GATHER_BLOCK,
    )
    gathered_b = te.compute(
        (Q, positions, N),
        lambda q, p, n: tirx.if_then_else(listed(q, p), B[column(q, p), n], zero),
        name=GATHER_B_BLOCK,
    )
    p = te.reduce_axis((0, positions), name="p")
    acc = te.compute(
        (Q, bm, N),
        lambda q, r, n: te.sum(gathered_a[q, r, p].astype("float32") * gathered_b[q, p, n].astype("float32"), axis=p),
        name="C",
    )
    out = acc if out_dtype == "float32" else te.compute(acc.shape, lambda *i: acc(*i).astype(out_dtype), name=CAST_BLOCK)
    func = te.create_prim_func([A, B, cnt, idx, out])
    counts = func.params[2]
    extent = tirx.IndexMap.from_func(lambda q: [tirx.BufferLoad(counts, [q]) * bk], index_dtype="int32")
    return func.with_attr(REDUCTION_EXTENT, extent)


@kept_per_plan
def reduce_tile_knobs(plan: PITPlan, ndim: int, K: int, N: int, dtype: str, out_dtype: str, target: Target):
    """The tile's knobs where it computes ``plan``, else None (the SIMT kernel runs).

    It serves the reduce form of a 2-D float16 or bfloat16 A stored (m, k) with B stored (k, n),
    output in A's dtype or float32, row blocks of 16 to 128 rows (one per thread block), N a
    multiple of 64, and K a multiple of 8 (whole 16-byte copies); any M and any chunk width.
    Asked on every call: answers are kept.
    """
    if plan.form != "reduce" or plan.sparse != "a":
        return None
    bm, bk = plan.tile["m"], plan.tile["k"]
    block_n = next((b for b in (128, 64) if N % b == 0), None)
    wide = bm == 64 and N % 256 == 0  # measured on an H200: 64-row blocks run faster 256 wide
    applies = (
        ndim == 2
        and plan.contraction.order("a") == ("m", "k")
        and plan.contraction.order("b") == ("k", "n")
        and dtype in INPUT_DTYPES
        and out_dtype in (dtype, "float32")
        and bm in ROW_BLOCKS
        and block_n is not None
        and K % VECTOR == 0
        and TensorCoreMatmul().is_target_available(target)
    )
    if not applies:
        return None
    warps_m = 2 if bm == 128 else 1
    fragments_n = 4 if wide else 2
    block_n = 256 if wide else block_n
    return TensorCoreMatmul.Knobs(
        block_m=bm,
        block_n=block_n,
        block_k=32,
        warps_m=warps_m,
        warps_n=block_n // (fragments_n * MMA),
        fragments_m=bm // (MMA * warps_m),
        fragments_n=fragments_n,
        vector_a=math.gcd(bk, VECTOR),  # A's columns come in runs of bk
        stages=1,
    ).pipelined()


def reduce_tile_space(default: TensorCoreMatmul.Knobs, N: int) -> list[TensorCoreMatmul.Knobs]:
    """The tile's knob settings the tuner measures for one plan, ``default`` first.

    The micro-tile fixes the rows (``block_m``, ``warps_m``, ``fragments_m``) and A's vector width;
    the tuner varies the columns per thread block (64, 128 or 256 where they divide ``N``), how
    many 16-wide accumulators each warp holds along them, the k step (32 or 64 positions) and
    the pipeline depth (2 or 3 shared-memory stages; the default's columns also unpipelined).
    """
    space = [default] + ([dataclasses.replace(default, stages=1)] if default.stages > 1 else [])
    for block_n in (b for b in (64, 128, 256) if N % b == 0):
        for fragments_n in (2, 4):
            warps_n = block_n // (MMA * fragments_n)
            if warps_n < 1 or not 1 <= default.warps_m * warps_n <= 8:
                continue
            for block_k, stages in itertools.product((32, 64), (2, 3)):
                if shared_memory_problem(default.block_m, block_n, block_k, stages) is not None:
                    continue
                knobs = dataclasses.replace(
                    default, block_n=block_n, fragments_n=fragments_n, warps_n=warps_n, block_k=block_k, stages=stages
                )
                if knobs not in space:
                    space.append(knobs)
    return space


def fitting_knobs(default: TensorCoreMatmul.Knobs, tuned, N: int) -> TensorCoreMatmul.Knobs:
    """``tuned`` (from the tile database, whose shape buckets span several N) where it still
    fits this call's tile and ``N``, else ``default``."""
    fits = (
        isinstance(tuned, TensorCoreMatmul.Knobs)
        and (tuned.block_m, tuned.warps_m, tuned.fragments_m, tuned.vector_a)
        == (default.block_m, default.warps_m, default.fragments_m, default.vector_a)
        and N % tuned.block_n == 0
    )
    return tuned if fits else default


@functools.lru_cache(maxsize=1024)  # looked up on every call; the cache keeps what it returns for good
def reduce_tile_kernel(
    K: int, N: int, bm: int, bk: int, out_dtype: str, target: Target, cache: KernelCache, knobs, dtype: str = "float16"
):
    """The compiled ``main(A, B, cnt, idx, C)`` of :func:`build_reduce_tile`."""
    template = TensorCoreMatmul()
    signature = f"K={K} N={N} bm={bm} bk={bk} v{template.version}"
    key = kernel_key("reduce_tile", signature, {"in": dtype, "out": out_dtype}, target, knobs)

    def build():
        func = build_reduce_tile(K, N, bm, bk, knobs.block_k, out_dtype, dtype)
        return compile_primfunc(func, target, knobs, what=f"tensor-core reduce {signature}", template=template)

    return cache.main(key, build)
