"""The row-gather PIT matmul on tensor cores: listed rows of A gathered into dense MMA tiles.

For whole-row micro-tiles (the spatial axis m permuted, one k block): the listed rows are
gathered in the global->shared copy of a dense tensor-core tile (:mod:`..schedules.tensor_core_matmul`)
into a packed float32 result, which a second kernel scatters back to the rows' own places
(SWrite), zeroing the unlisted ones. K and N are static (multiples of the tile); the number of
gathered rows is a run-time argument, so one build serves any sparsity.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target import Target

from pit_compiler.runtime.cache import KernelCache
from pit_compiler.schedules.mma_intrinsics import INPUT_DTYPES
from pit_compiler.schedules.tensor_core_matmul import GATHER_BLOCK, TensorCoreMatmul

from .build import compile_primfunc, default_knobs, kernel_key

PARALLEL_LOOPS = "pit.parallel_loops"


def build_row_gather_tile(K: int, N: int, block_m: int, dtype: str = "float16"):
    """``main(A, B, idx, Cp, row_blocks)``: ``Cp[i, n] = sum_k A[idx[i], k] * B[k, n]``, i < row_blocks*block_m."""
    row_blocks = tirx.Var("row_blocks", "int32")
    M = tirx.Var("M", "int32")
    rows = row_blocks * block_m
    A = te.placeholder((M, K), dtype, name="A")
    B = te.placeholder((K, N), dtype, name="B")
    idx = te.placeholder((rows,), "int32", name="idx")
    gathered = te.compute((rows, K), lambda i, k: A[idx[i], k], name=GATHER_BLOCK)
    k = te.reduce_axis((0, K), name="k")
    packed = te.compute(
        (rows, N),
        lambda i, j: te.sum(gathered[i, k].astype("float32") * B[k, j].astype("float32"), axis=k),
        name="C",
    )
    return te.create_prim_func([A, B, idx, packed, row_blocks])


def build_row_scatter(out_dtype: str):
    """``main(cp, c, cnt, idx)``: zero C, then ``C[idx[i], :] = Cp[i, :]`` for ``i < cnt[0]``."""

    @T.prim_func(s_tir=True)
    def main(cp: T.handle, c: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        R, M, N = T.int32(), T.int32(), T.int32()
        Cp = T.match_buffer(cp, (R, N), "float32")
        C = T.match_buffer(c, (M, N), out_dtype)
        Cnt = T.match_buffer(cnt, (1,), "int32")
        Idx = T.match_buffer(idx, (R,), "int32")
        for i, j in T.grid(M, N):
            with T.sblock("zero"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.sblock_attr({PARALLEL_LOOPS: 2})
                C[vi, vj] = T.Cast(out_dtype, 0)
        for e, j in T.grid(R, N):
            with T.sblock("scatter"):
                ve, vj = T.axis.remap("SS", [e, j])
                T.sblock_attr({PARALLEL_LOOPS: 2})
                T.reads(Cp[ve, vj], Cnt[0], Idx[ve])
                T.writes(C[0:M, vj])
                if ve < Cnt[0]:
                    C[Idx[ve], vj] = T.Cast(out_dtype, Cp[ve, vj])

    return main


def fits_tensor_cores(K: int, N: int, dtype: str, target: Target, knobs: TensorCoreMatmul.Knobs) -> bool:
    """Whether the tensor-core tile covers this shape without tails (else the SIMT path runs)."""
    return (
        dtype in INPUT_DTYPES
        and TensorCoreMatmul().is_target_available(target)
        and K % knobs.block_k == 0
        and N % knobs.block_n == 0
    )


def row_gather_kernels(K: int, N: int, dtype: str, out_dtype: str, target: Target, cache: KernelCache, knobs=None):
    """The compiled ``(tile, scatter)`` pair for ``K x N`` on ``target``."""
    template = TensorCoreMatmul()
    knobs = knobs if knobs is not None else template.Knobs()
    tile_key = kernel_key("row_gather_tile", f"K={K} N={N} v{template.version}", {"in": dtype}, target, knobs)

    def build_tile():
        func = build_row_gather_tile(K, N, knobs.block_m, dtype)
        return compile_primfunc(func, target, knobs, what=f"tensor-core row gather K={K} N={N}", template=template)

    scatter_key = kernel_key("row_scatter", "v1", {"out": out_dtype}, target, default_knobs(target))

    def build_scatter():
        return compile_primfunc(build_row_scatter(out_dtype), target, what="row scatter")

    return cache.main(tile_key, build_tile), cache.main(scatter_key, build_scatter)
