"""PIT's forms on the Hopper warpgroup tile (:mod:`..schedules.warpgroup_matmul`): where each
thread block's rows and k positions come from.

- Reduce form (blocks of A, ``bm x bk`` with ``bm`` (32, 64 or 128) rows per thread block):
  thread block ``t`` is row block ``t``; its condensed k position ``p`` is column
  ``idx[t, p // bk] * bk + p % bk`` of A and that row of B; it runs over its own listed chunks
  only and writes its rows of C in place.
- Packed reduce form (chunks narrower than 8 columns, knob ``pack_a``): a first kernel copies
  each row block's listed chunks of A to a packed buffer, position ``p`` at column ``p``
  (zeros past the listed ones, up to the next 64 positions), so that the tile copies A 16 bytes
  at a time instead of gathering it element by element in every thread block of a row block;
  B's rows are gathered as in the reduce form.
- Row gather (whole rows or runs of ``rpc`` rows of A): gathered row ``g`` is row
  ``idx[0, g // rpc] * rpc + g % rpc``; thread blocks past the listed rows do nothing, and each
  row's result is written straight to its own row of C (C's unlisted rows are zeroed before).
- Strips (row pieces of one k chunk, ``rpc x bk``: 1x32, 1x64 ...): each chunk of k lists its own
  rows, gathered as above per chunk; their products are added to a float32 C zeroed before, or
  with the knob ``adds16`` to a 16-bit one (:mod:`..schedules.warpgroup_strips`).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from pit_compiler.runtime.cache import KernelCache
from pit_compiler.schedules.warpgroup_matmul import (
    BLOCK_K,
    CHUNK,
    INPUT_DTYPES,
    OUTPUT_DTYPES,
    Access,
    WarpgroupMatmul,
    hopper_target,
)

from pit_compiler.schedules import warpgroup_strips
from pit_compiler.schedules.common import PARALLEL_LOOPS

from .build import CompilationError, compile_primfunc, default_knobs, kept_per_plan, kernel_key


def reduce_access(bm: int, bk: int, K: int) -> Access:
    """Row block ``t`` sums over its listed chunks of ``bk`` columns (see the module docstring)."""

    def k_source(ops, t, p):
        chunk = tirx.min(p // bk, ops.P - 1)  # positions past the listed chunks still read idx
        column = ops.Idx[t, chunk] * bk + p % bk
        return column, tirx.all(p // bk < ops.Cnt[t], column < K)

    return Access(
        name=f"reduce bm={bm} bk={bk}",
        row_tiles=lambda ops, block_m: ops.Q,
        steps=lambda ops, t: (ops.Cnt[t] * bk + BLOCK_K - 1) // BLOCK_K,
        row=lambda ops, t, r: (t * bm + r, t * bm + r < ops.M),
        k_source=k_source,
        k_run=bk,
    )


def packed_columns(bk: int, K: int) -> int:
    """The packed copy's width: every chunk of ``bk`` columns listed, to whole steps of 64."""
    return -(-(-(-K // bk) * bk) // BLOCK_K) * BLOCK_K


def packed_access(bm: int, bk: int, K: int) -> Access:
    """The reduce form reading A from its packed copy (see the module docstring)."""
    gathered = reduce_access(bm, bk, K)
    return Access(
        name=f"reduce packed bm={bm} bk={bk}",
        row_tiles=gathered.row_tiles,
        steps=gathered.steps,
        row=gathered.row,
        k_source=gathered.k_source,
        k_run=packed_columns(bk, K),
        a_source=lambda ops, t, p: (p, p < ops.Cnt[t] * bk),
        a_columns=packed_columns(bk, K),
    )


PACK_LANES = 32  # threads per row of the pack: one warp writes 64 consecutive bytes of it


def build_pack(bm: int, bk: int, K: int, dtype: str):
    """``main(a, cnt, idx, ap)``: ``Ap[r, p] = A[r, idx[r // bm, p // bk] * bk + p % bk]`` for the
    listed positions ``p`` of row ``r``'s block, zero past them (and past K) to a whole step of
    64; the rest of ``Ap``, which the tile never reads, is not written, so the pass moves bytes
    in proportion to what is listed (writing the whole copy made 32x1 pieces at 99 % slower
    packed than gathered).

    The grid is ``M x 32`` threads, each row's 32 looping over its block's listed positions
    only: a thread per position of the whole width (all of k) was launched before, and at 90 %
    its 67 million mostly idle threads took 0.32 ms at 8192^3 on an H200."""
    width = packed_columns(bk, K)

    @T.prim_func(s_tir=True)
    def main(a: T.handle, cnt: T.handle, idx: T.handle, ap: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        M, Q, P = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (M, K), dtype)
        Cnt = T.match_buffer(cnt, (Q,), "int32")
        Idx = T.match_buffer(idx, (Q, P), "int32")
        Ap = T.match_buffer(ap, (M, width), dtype)
        for r, lane in T.grid(M, PACK_LANES):
            with T.sblock("pack"):
                vr, vl = T.axis.remap("SS", [r, lane])
                T.sblock_attr({PARALLEL_LOOPS: 2})
                T.reads(A[vr, 0:K], Cnt[vr // bm], Idx[vr // bm, 0:P])
                T.writes(Ap[vr, 0:width])
                listed = T.meta_var(Cnt[vr // bm] * bk)
                for i in T.serial((listed + BLOCK_K - 1) // BLOCK_K * (BLOCK_K // PACK_LANES)):
                    p = T.meta_var(i * PACK_LANES + vl)
                    column = T.meta_var(Idx[vr // bm, T.min(p // bk, P - 1)] * bk + p % bk)
                    Ap[vr, p] = T.if_then_else(
                        p < listed and column < K, A[vr, T.max(T.min(column, K - 1), 0)], T.Cast(dtype, 0)
                    )

    return main


@functools.lru_cache(maxsize=256)  # looked up on every packed call
def pack_kernel(bm: int, bk: int, K: int, dtype: str, target: Target, cache: KernelCache):
    """The compiled :func:`build_pack` for ``target``."""
    key = kernel_key("warpgroup_pack", f"bm={bm} bk={bk} K={K} v3", {"in": dtype}, target, default_knobs(target))
    return cache.main(key, lambda: compile_primfunc(build_pack(bm, bk, K, dtype), target, what=f"A pack {bm}x{bk}"))


def row_gather_access(rows_per_chunk: int, K: int, block_m: int) -> Access:
    """Thread block ``t`` computes gathered rows ``t * block_m ...`` (see the module docstring)."""

    def row(ops, t, r):
        return warpgroup_strips.gathered_row(ops.Cnt, ops.Idx, ops.M, ops.P, 0, t * block_m + r, rows_per_chunk)

    return Access(
        name=f"row gather rpc={rows_per_chunk}",
        row_tiles=lambda ops, bm: (ops.P * rows_per_chunk + bm - 1) // bm,
        steps=lambda ops, t: tirx.Select(t * block_m < ops.Cnt[0] * rows_per_chunk, (K + BLOCK_K - 1) // BLOCK_K, 0),
        row=row,
        k_source=lambda ops, t, p: (p, p < K),
        k_run=K,
    )


@functools.lru_cache(maxsize=1024)  # looked up on every call; the cache keeps what it returns for good
def warpgroup_kernel(form: str, shape: tuple, K: int, N: int, dtype: str, out_dtype: str, target: Target,
                     cache: KernelCache, knobs: WarpgroupMatmul.Knobs, b_k_major: bool = False):
    """The compiled ``main(A, B, cnt, idx, C)`` of ``form`` ("reduce" with ``shape = (bm, bk)``,
    "row_gather" with ``shape = (rows_per_chunk,)``, "strips" with ``shape = (rows_per_chunk, bk)``,
    whose C is :func:`~pit_compiler.schedules.warpgroup_strips.c_dtype`, passed as ``out_dtype``);
    B stored ``(K, N)``, or ``(N, K)`` with ``b_k_major`` (:func:`reads_b_k_major`)."""
    import tvm

    template = WarpgroupMatmul()
    signature = f"{form} {shape} K={K} N={N} v{template.version}" + (" B(n,k)" if b_k_major else "")
    key = kernel_key("warpgroup", signature, {"in": dtype, "out": out_dtype}, target, knobs)

    def build():
        if form == "strips":
            func = warpgroup_strips.kernel(knobs, K, N, *shape, dtype)
        elif form == "reduce":
            access = (packed_access if knobs.pack_a else reduce_access)(*shape, K)
            func = template.kernel(knobs, K, N, dtype, out_dtype, access, b_k_major)
        else:
            func = template.kernel(knobs, K, N, dtype, out_dtype, row_gather_access(*shape, K, knobs.block_m), b_k_major)
        try:
            return tvm.compile(tvm.IRModule({"main": func}), target=hopper_target(target), tir_pipeline="tirx")
        except Exception as error:  # TVM raises many types; the user gets one, with the cause
            raise CompilationError(
                f"TVM could not build the PIT warpgroup {signature} for {str(target)!r} with knobs {knobs!r}: "
                f"{type(error).__name__}: {error}"
            ) from error

    return cache.main(key, build)


# B stored (n, k), an nn.Linear weight's W.t(), read in place (K-major, laid out in shared memory
# as A is) by the blocks and gathered rows whose chunks of k are multiples of 8 columns. Built and
# checked on the CPU (session 15: the copies, descriptors and builds), not yet run on a GPU:
# until its gpu tests pass there, such products read B from a compact (k, n) copy instead.
READS_B_AS_STORED = False


def reads_b_k_major(plan) -> bool:
    """Whether the warpgroup tile computing ``plan`` reads B stored ``(n, k)`` (K-major)."""
    return plan.contraction.order("b") == ("n", "k")


def warpgroup_knobs(plan, ndim: int, K: int, N: int, dtype: str, b_dtype: str, out_dtype: str, target: Target):
    """The warpgroup tile's default knobs where it computes ``plan`` on this call, else None.

    It serves a 2-D float16 or bfloat16 A stored (m, k) with B stored (k, n) of the same dtype
    (or, with :data:`READS_B_AS_STORED`, stored (n, k) where its chunks of k are multiples of 8),
    K and N multiples of 8 (16-byte rows), on sm_90: the reduce form of blocks of 32 (the
    transposed tile), 64 or 128 rows (one thread block each), their chunks of k copied 8
    columns at a time where they are multiples of 8, else packed first (on 32 rows) or
    element by element (32x1 pieces); whole rows (row gather; the default tile is 128 rows,
    :func:`row_gather_knobs` picks shorter ones for few rows); and row pieces of k chunks 8 to 64
    columns wide (strips: 1x32, 1x64 ...). Asked on every call: answers are kept.
    """
    return _warpgroup_knobs(plan, ndim, K, N, dtype, b_dtype, out_dtype, target, READS_B_AS_STORED)


@kept_per_plan
def _warpgroup_knobs(plan, ndim: int, K: int, N: int, dtype: str, b_dtype: str, out_dtype: str, target: Target,
                     reads_b_as_stored: bool):
    template = WarpgroupMatmul()
    k_major_b = reads_b_as_stored and reads_b_k_major(plan) and not plan.accumulate and plan.tile["k"] % CHUNK == 0
    applies = (
        template.is_target_available(target)
        and ndim == 2
        and plan.sparse == "a"
        and plan.contraction.order("a") == ("m", "k")
        and (plan.contraction.order("b") == ("k", "n") or k_major_b)
        and dtype == b_dtype
        and dtype in INPUT_DTYPES
        and out_dtype in OUTPUT_DTYPES
        and K % CHUNK == 0
        and N % CHUNK == 0
    )
    if not applies:
        return None
    if plan.form == "reduce" and plan.tile["m"] in (32, 64, 128):
        return template.default(plan.tile["m"], narrow_k=plan.tile["k"] % CHUNK != 0)
    if plan.form == "scatter" and not plan.accumulate:
        return template.default(128, row_gather=True)
    if plan.form == "scatter" and warpgroup_strips.serves_chunk(plan.tile["m"], plan.tile["k"]):
        return warpgroup_strips.default()
    return None


def warpgroup_form(plan) -> tuple[str, tuple]:
    """``(form, shape)`` of :func:`warpgroup_kernel` that computes ``plan``."""
    if plan.form == "reduce":
        return "reduce", (plan.tile["m"], plan.tile["k"])
    if plan.accumulate:
        return "strips", (plan.tile["m"], plan.tile["k"])
    return "row_gather", (plan.tile["m"],)


def row_gather_knobs(default: WarpgroupMatmul.Knobs, rows: int | None, N: int, sms: int) -> WarpgroupMatmul.Knobs:
    """Knobs for ``rows`` gathered rows (None: not known yet) of an ``N``-column product on
    ``sms`` SMs: ``default``, or where its thread blocks would fill less than half the SMs,
    the first shorter, narrower tile whose blocks do (the last where none does).

    Each thread block walks all of k, so few blocks leave SMs idle for the whole call. Measured
    on an H200 (132 SMs, float16, kernel with the output's zeroing): 82 rows of 8192^3, 0.153 ms
    on 32 blocks of 128x256, 0.112 on 128 of 64x128; 41 rows of 4096^3, 0.069 ms on 16 blocks,
    0.042 on 32 of 64x128, 0.037 on 64 of 64x64; 410 rows of 4096^3, 0.071 ms on 64 blocks,
    0.051 on 224 of 64x128; while 128 and 224 blocks of 128x256 (410 and 819 rows of 8192^3)
    ran best as they were (0.176 and 0.289 ms, against 0.208 and 0.368 on 64x128).
    """
    if rows is None:
        return default
    candidates = (default, *_shorter_row_tiles())
    for knobs in candidates:
        if -(-rows // knobs.block_m) * -(-N // knobs.block_n) >= sms / 2:
            return knobs
    return candidates[-1]


@functools.lru_cache(maxsize=None)
def _shorter_row_tiles() -> tuple:
    """64x128, then 64x64 (built once: knobs check themselves when made, on every call else)."""
    shorter = WarpgroupMatmul().default(64, row_gather=True)
    return shorter, replace(shorter, block_n=64)


def fitting_warpgroup_knobs(default: WarpgroupMatmul.Knobs, tuned, plan) -> WarpgroupMatmul.Knobs:
    """``tuned`` (from the tile database or the tuner) where it fits the call's rows (any
    height for gathered rows, the row block's own for blocks, a setting the strips kernel has
    for strips), else ``default``."""
    if not isinstance(tuned, WarpgroupMatmul.Knobs) or (tuned.adds16 and not plan.accumulate):
        return default
    if plan.form == "reduce":
        return tuned if tuned.block_m == default.block_m else default
    if plan.accumulate:
        try:
            warpgroup_strips.check_knobs(tuned)
        except ValueError:
            return default
    return tuned


def warpgroup_space(default: WarpgroupMatmul.Knobs, plan=None) -> list[WarpgroupMatmul.Knobs]:
    """The settings the tuner measures for ``plan``, ``default`` first: columns, stages and MMA
    overlap vary; the rows are fixed for blocks (one row block per thread block) and vary for
    gathered rows, which are also split along k; for chunks narrower than 8 columns A is
    gathered or packed first. Strips: :func:`~pit_compiler.schedules.warpgroup_strips.space`."""
    if plan is not None and plan.accumulate:
        return warpgroup_strips.space(default)
    narrow = plan is not None and plan.form == "reduce" and plan.tile["k"] % CHUNK != 0
    rows = plan is not None and plan.form != "reduce"
    return list(WarpgroupMatmul().space(default.block_m, first=default, narrow_k=narrow, any_height=rows))
