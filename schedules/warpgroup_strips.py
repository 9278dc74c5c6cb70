"""Row pieces of one k chunk (1x32, 1x64, 2x32 ... pieces of A) on Hopper's warpgroup MMA.

These pieces leave both m and k sparse: a chunk of ``bk`` columns of A lists its own rows. PIT
permutes m inside each chunk (the scatter form with ``accumulate``): the rows a chunk lists are
gathered into dense tiles, multiplied by the chunk's ``bk`` rows of B, and the partial products
of several chunks meet in one output row, where they are added with atomics. No tile can keep a
row's sum on chip across chunks, because each chunk lists other rows; that is the price of
pieces this fine, and it is paid in bytes added to C (4 per output element per listed piece, 2
with 16-bit adds), not in multiplies.

One thread block per (chunk, column tile):

- **B once.** The chunk's ``bk`` rows of B for the block's ``block_n`` columns are copied to
  shared memory once (MN-major, 128-byte swizzle, as :mod:`.warpgroup_matmul` lays out B).
- **SRead, pipelined.** The block walks its chunk's listed rows ``block_m`` at a time; each row
  tile's pieces (``bk`` columns of each gathered row) are copied with ``cp.async`` into one of
  ``stages`` buffers, ``stages - 1`` row tiles ahead of the MMAs. Rows past the chunk's count
  and columns past K are zero-filled.
- **MMA.** ``ceil(bk / 16)`` ``wgmma.m64n{block_n}k16`` per warpgroup and row tile; the first
  overwrites the accumulators.
- **SWrite as adds.** Each thread adds its accumulators, four columns at a time (two threads
  swap pairs), to its rows of C with ``red.global.add.v4.f32``: no return value, so nothing
  waits for it, and the next row tile's MMAs start at once. C is float32 (zeroed before),
  whatever the inputs, so the partial sums are added at full precision (the caller casts once
  at the end). With the knob ``adds16``, C has the inputs' 16-bit type instead and each thread
  adds eight columns at a time (the four threads of a quad swap pairs) with
  ``red.global.add.noftz.v4.f16x2`` (or ``bf16x2``): half the bytes and half the reductions,
  no float32 C to clear and cast, but every add is rounded to 16 bits.

Knobs (a :class:`~.warpgroup_matmul.WarpgroupMatmul.Knobs`): ``block_m`` (64 or 128 rows: one or
two warpgroups), ``block_n``, ``stages``, ``row_tiles_first``, which here launches the chunks
of one column tile one after another (else the column tiles of one chunk, which share its rows of
A in L2), and ``adds16``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from tvm import tirx
from tvm.script import tirx as T

from .common import check
from .warpgroup_matmul import (
    BLOCK_K,
    CHUNK,
    INPUT_DTYPES,
    MMA_K,
    PANEL_STRIDE,
    ROW_GROUP_STRIDE,
    SWIZZLE_128B,
    WARPGROUP,
    WARPGROUP_ROWS,
    WarpgroupMatmul,
    b_copy,
    block_tile,
    swizzled,
)

Knobs = WarpgroupMatmul.Knobs
MAX_CHUNK = BLOCK_K  # the widest k chunk: one swizzled 128-byte row of A per gathered row
RED_PAIRS = "pit_red_f32x4_pairs"
# Called by every lane of a warp (it shuffles): lanes 2j and 2j + 1 hold two columns each of
# two 8-column groups of one row; they swap pairs so that each adds four consecutive columns,
# 16 bytes, with one reduction (the even lane the first group's, the odd lane the second's).
# H100, 8192^3 float16, tile alone: 1x32 pieces at 99 % took 0.70-0.72 ms adding two columns
# a reduction, 0.665-0.675 adding four; 1x64 at 95 % 1.134-1.155 against 0.995-1.019.
RED_SOURCE = f"""
__forceinline__ __device__ void {RED_PAIRS}(float* out, int add, int odd, float a0, float a1, float b0, float b1) {{
    float r0 = __shfl_xor_sync(0xffffffffu, odd ? a0 : b0, 1);
    float r1 = __shfl_xor_sync(0xffffffffu, odd ? a1 : b1, 1);
    float v0 = odd ? r0 : a0, v1 = odd ? r1 : a1, v2 = odd ? b0 : r0, v3 = odd ? b1 : r1;
    if (add) asm volatile("red.global.add.v4.f32 [%0], {{%1, %2, %3, %4}};" :: "l"(out), "f"(v0), "f"(v1), "f"(v2), "f"(v3) : "memory");
}}
"""
PACKED_PAIRS = {"float16": "f16x2", "bfloat16": "bf16x2"}  # two 16-bit columns in 32 bits


def red_quads(dtype: str) -> tuple[str, str]:
    """``(name, source)`` of the 16-bit adds' helper for ``dtype``, called by every lane of a warp (it shuffles): the
    four lanes of a quad hold two columns each of four 8-column groups of one row; they swap
    those pairs (a 4 x 4 transpose: in round ``r`` lanes ``t`` and ``t ^ r`` trade their pairs
    of each other's group), so that lane ``t`` adds the ``t``-th group, eight consecutive
    columns, 16 bytes, with one reduction."""
    packed = PACKED_PAIRS[dtype]
    return f"pit_red_{packed}_quads", f"""
__forceinline__ __device__ unsigned pit_pack_{packed}(float lo, float hi) {{
    unsigned d;  // cvt puts its first source in the upper half: hi, then lo
    asm("cvt.rn.{packed}.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}}
__forceinline__ __device__ unsigned pit_pick4(int x, unsigned a, unsigned b, unsigned c, unsigned d) {{
    return x == 0 ? a : x == 1 ? b : x == 2 ? c : d;
}}
__forceinline__ __device__ void pit_red_{packed}_quads(void* out, int add, int t, float a0, float a1, float a2, float a3,
                                                 float a4, float a5, float a6, float a7) {{
    unsigned v0 = pit_pack_{packed}(a0, a1), v1 = pit_pack_{packed}(a2, a3);
    unsigned v2 = pit_pack_{packed}(a4, a5), v3 = pit_pack_{packed}(a6, a7);
    unsigned s0 = pit_pick4(t, v0, v1, v2, v3);  // received in round r: lane (t ^ r)'s pair of group t
    unsigned s1 = __shfl_xor_sync(0xffffffffu, pit_pick4(t ^ 1, v0, v1, v2, v3), 1);
    unsigned s2 = __shfl_xor_sync(0xffffffffu, pit_pick4(t ^ 2, v0, v1, v2, v3), 2);
    unsigned s3 = __shfl_xor_sync(0xffffffffu, pit_pick4(t ^ 3, v0, v1, v2, v3), 3);
    unsigned w0 = pit_pick4(t, s0, s1, s2, s3), w1 = pit_pick4(t ^ 1, s0, s1, s2, s3);  // columns 0-1, 2-3
    unsigned w2 = pit_pick4(t ^ 2, s0, s1, s2, s3), w3 = pit_pick4(t ^ 3, s0, s1, s2, s3);  // 4-5, 6-7
    if (add) asm volatile("red.global.add.noftz.v4.{packed} [%0], {{%1, %2, %3, %4}};" :: "l"(out), "r"(w0), "r"(w1), "r"(w2), "r"(w3) : "memory");
}}
"""


def serves_chunk(rows_per_chunk: int, bk: int) -> bool:
    """Whether this kernel takes pieces of ``rows_per_chunk`` rows and ``bk`` columns: chunks of
    whole 16-byte copies (``bk`` a multiple of 8), at most one 64-column step wide."""
    return rows_per_chunk >= 1 and bk % CHUNK == 0 and bk <= MAX_CHUNK


def default() -> Knobs:
    """One warpgroup, 256 columns, 4 buffers of row tiles, the chunks of one column tile one
    after another, so that the blocks running at once add to the same columns of C (which stay
    in L2). H100, 8192^3 float16, tile alone: 1x32 pieces at 99 %, every setting in that order
    0.665-0.675 ms (this one 0.671), against 0.972-0.980 for its widths with the column tiles of
    one chunk together; 1x64 at 95 %, 0.995-1.019 against 2.03-2.11; 1x32 at 90 % (two columns
    a reduction), 3.83-3.97 against 7.98-8.62."""
    return Knobs(block_m=64, block_n=256, stages=4, overlap=False, row_tiles_first=True)


def space(first: Knobs | None = None) -> list[Knobs]:
    """Every setting the tuner measures, ``first`` (default: :func:`default`) first: one or two
    warpgroups, 64 to 256 columns, 2 to 4 buffers, and the default's widths in the other
    launch order and with the other adds (16-bit or float32)."""
    first = first or default()
    settings = [Knobs(block_m=block_m, block_n=block_n, stages=stages, overlap=False, row_tiles_first=first.row_tiles_first)
                for block_m in (64, 128) for block_n in (256, 128, 64) for stages in (4, 3, 2)]
    settings += [replace(first, block_n=block_n, row_tiles_first=not first.row_tiles_first) for block_n in (256, 128, 64)]
    settings += [replace(first, block_n=block_n, adds16=not first.adds16) for block_n in (256, 128, 64)]
    return [first, *(knobs for knobs in settings if knobs != first)]


def c_dtype(knobs: Knobs, dtype: str) -> str:
    """The type of the C the chunks add to: the inputs' with ``adds16``, else float32."""
    return dtype if knobs.adds16 else "float32"


def check_knobs(knobs: Knobs) -> None:
    """The settings of :class:`Knobs` this kernel has: no transposed tile, no split k, no pack."""
    check(knobs.block_m in (64, 128), f"row pieces take block_m 64 or 128 (one or two warpgroups), got {knobs.block_m!r}")
    check(knobs.split_k == 1 and not knobs.pack_a, f"row pieces take no split_k or pack_a, got {knobs!r}")
    check(knobs.stages >= 2, f"row pieces need stages >= 2, got {knobs.stages!r}")


def shared_bytes(knobs: Knobs) -> int:
    """B's chunk (one 64-position step of ``block_n`` columns) and ``stages`` row tiles of A."""
    return (BLOCK_K * knobs.block_n + knobs.stages * knobs.block_m * BLOCK_K) * 2


def gathered_row(Cnt, Idx, M, P, q, g, rows_per_chunk: int):
    """``(row of A and C, listed)`` of gathered row ``g`` of chunk ``q``: row ``g % rows_per_chunk``
    of the ``g // rows_per_chunk``-th listed chunk of rows."""
    listed_chunk = g // rows_per_chunk
    row = Idx[q, tirx.min(listed_chunk, P - 1)] * rows_per_chunk + g % rows_per_chunk
    return row, tirx.all(listed_chunk < Cnt[q], row < M)


def row_tiles(Cnt, q, rows_per_chunk: int, block_m: int):
    """Row tiles of ``block_m`` gathered rows that chunk ``q`` lists."""
    return (Cnt[q] * rows_per_chunk + block_m - 1) // block_m


def kernel(knobs: Knobs, K: int, N: int, rows_per_chunk: int, bk: int, dtype: str) -> tirx.PrimFunc:
    """``main(A, B, Cnt, Idx, C)``: ``C[rows of chunk q] += A[those rows, chunk q] @ B[chunk q]``
    for every k chunk ``q`` of ``bk`` columns; ``C`` of :func:`c_dtype`, zeroed by the caller."""
    check(dtype in INPUT_DTYPES, f"the warpgroup tile takes {sorted(INPUT_DTYPES)} inputs, got {dtype!r}")
    check(serves_chunk(rows_per_chunk, bk), f"row pieces need a chunk of k that is a multiple of {CHUNK} up to {MAX_CHUNK}, got {bk!r}")
    check(K % CHUNK == 0 and N % CHUNK == 0, f"K and N must be multiples of {CHUNK} (16-byte rows), got {K}, {N}")
    check_knobs(knobs)
    return _kernel(knobs, K, N, rows_per_chunk, bk, dtype)


def _kernel(knobs: Knobs, K: int, N: int, rpc: int, bk: int, dtype: str):
    BM, BN, S = knobs.block_m, knobs.block_n, knobs.stages
    THREADS, ACC = knobs.threads, knobs.accumulators
    Q = math.ceil(K / bk)  # chunks of k: the index's blocks
    TILES_N = math.ceil(N / BN)
    MMAS = math.ceil(bk / MMA_K)  # wgmma per row tile; positions past bk are zero in A and B
    POSITIONS = MMAS * MMA_K  # k positions copied per row
    ROW_COPIES = POSITIONS // CHUNK  # 16-byte copies per gathered row
    A_COPIES = BM * ROW_COPIES // THREADS  # per thread and row tile (POSITIONS is a multiple of 16)
    B_TOTAL = POSITIONS * BN // CHUNK
    B_COPIES = math.ceil(B_TOTAL / THREADS)
    A_TILE = BM * BLOCK_K  # elements per buffer of A (full 64-position rows: the swizzle's)
    AHEAD = S - 1  # row tiles whose copies are in flight
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{INPUT_DTYPES[dtype]}.{INPUT_DTYPES[dtype]}"
    zero, full = T.uint32(0), T.uint32(16)
    red16, red16_source = red_quads(dtype)

    @T.prim_func
    def main(a: T.handle, b: T.handle, cnt: T.handle, idx: T.handle, c: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        M, P = T.int32(), T.int32()
        A = T.match_buffer(a, (M, K), dtype, align=16)
        B = T.match_buffer(b, (K, N), dtype, align=16)
        Cnt = T.match_buffer(cnt, (Q,), "int32")
        Idx = T.match_buffer(idx, (Q, P), "int32")
        C = T.match_buffer(c, (M, N), c_dtype(knobs, dtype), align=16)
        T.device_entry()
        bid = T.cta_id([Q * TILES_N])
        tx = T.thread_id([THREADS])
        smem = T.alloc_buffer((shared_bytes(knobs) // 2,), dtype, scope="shared.dyn", align=1024)
        acc = T.alloc_buffer((ACC,), "float32", scope="local")
        desc_a: T.uint64
        desc_b: T.uint64
        q, column_tile, _ = T.meta_var(block_tile(bid, Q, TILES_N, 1, knobs.row_tiles_first))
        n0 = T.meta_var(column_tile * BN)
        group = T.meta_var(tx // WARPGROUP)
        lane = T.meta_var(tx % WARPGROUP)
        tiles: T.let[T.int32] = row_tiles(Cnt, q, rpc, BM)
        a_row = T.alloc_buffer((A_COPIES,), "int32", scope="local")
        a_bytes = T.alloc_buffer((A_COPIES,), "uint32", scope="local")
        out_row = T.alloc_buffer((2,), "int32", scope="local")
        out_listed = T.alloc_buffer((2,), "bool", scope="local")
        for s in T.serial(0, tiles + AHEAD):
            if s < tiles:
                if s == 0:  # the chunk's rows of B, once, in the first row tile's group
                    for j in T.unroll(B_COPIES):
                        copy = T.meta_var(j * THREADS + tx)
                        p, n_off, offset = T.meta_var(b_copy(copy, BN, False))
                        if copy < B_TOTAL:
                            inside = T.meta_var(p < bk and q * bk + p < K and n0 + n_off < N)
                            T.ptx["cp.async.cg.shared.global"](
                                smem.ptr_to([S * A_TILE + offset]),
                                B.ptr_to([T.if_then_else(inside, q * bk + p, 0), T.if_then_else(inside, n0 + n_off, 0)]),
                                16,
                                T.if_then_else(inside, full, zero),
                            )
                # SRead: the rows' sources first, all together, then the copies (each cp.async
                # orders memory, so a load between two of them would wait for the one before).
                for j in T.unroll(A_COPIES):
                    copy = T.meta_var(j * THREADS + tx)
                    row, listed = T.meta_var(gathered_row(Cnt, Idx, M, P, q, s * BM + copy // ROW_COPIES, rpc))
                    inside = T.meta_var(listed and copy % ROW_COPIES * CHUNK < bk and q * bk + copy % ROW_COPIES * CHUNK < K)
                    a_row[j] = T.if_then_else(inside, row, 0)
                    a_bytes[j] = T.if_then_else(inside, full, zero)
                for j in T.unroll(A_COPIES):
                    copy = T.meta_var(j * THREADS + tx)
                    column = T.meta_var(T.if_then_else(a_bytes[j] > zero, q * bk + copy % ROW_COPIES * CHUNK, 0))
                    T.ptx["cp.async.cg.shared.global"](
                        smem.ptr_to([s % S * A_TILE + swizzled(copy // ROW_COPIES, copy % ROW_COPIES)]),
                        A.ptr_to([a_row[j], column]),
                        16,
                        a_bytes[j],
                    )
            T.ptx.cp.async_.commit_group()
            if s >= AHEAD:  # the MMAs of row tile s - AHEAD, once its copies have landed
                u = T.meta_var(s - AHEAD)
                T.ptx.cp.async_.wait_group(AHEAD)
                T.ptx.fence.proxy.async_.shared__cta()  # cp.async wrote through the generic proxy
                T.cuda.cta_sync()
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(MMAS):
                    a_rows = T.meta_var(smem.ptr_to([u % S * A_TILE + group * WARPGROUP_ROWS * BLOCK_K + kk * MMA_K]))
                    T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), a_rows, 1, ROW_GROUP_STRIDE, SWIZZLE_128B)
                    T.cuda.wgmma.encode_matrix_descriptor(
                        T.address_of(desc_b), smem.ptr_to([S * A_TILE + kk * MMA_K * 64]), PANEL_STRIDE, ROW_GROUP_STRIDE, SWIZZLE_128B
                    )
                    # The first MMA overwrites the accumulators (scale-d 0).
                    T.ptx[wgmma](*[acc[i] for i in range(ACC)], desc_a, desc_b, kk > 0, 1, 1, 0, 1)
                T.ptx.wgmma.commit_group.sync.aligned()
                T.ptx.wgmma.wait_group.sync.aligned(0)
                T.cuda.cta_sync()  # every warpgroup is done with the buffer the next copies refill
                # SWrite: in wgmma's layout, register i * 4 + half * 2 + e of lane l holds row
                # l // 32 * 16 + l % 32 // 4 + half * 8 and column i * 8 + l % 4 * 2 + e.
                for half in T.unroll(2):
                    r = T.meta_var(group * WARPGROUP_ROWS + lane // 32 * 16 + lane % 32 // 4 + half * 8)
                    row, listed = T.meta_var(gathered_row(Cnt, Idx, M, P, q, u * BM + r, rpc))
                    out_row[half] = T.if_then_else(listed, row, 0)
                    out_listed[half] = listed
                if knobs.adds16:  # 8-column group i4 * 4 + t to lane t of each quad (N: whole groups)
                    for i4 in T.unroll(ACC // 16):
                        col = T.meta_var(n0 + i4 * 32 + lane % 4 * 8)
                        for half in T.unroll(2):
                            add = T.meta_var(out_listed[half] and col < N)
                            pairs = T.meta_var([acc[(i4 * 4 + j) * 4 + half * 2 + e] for j in range(4) for e in range(2)])
                            T.evaluate(T.cuda.func_call(
                                red16, C.ptr_to([out_row[half], T.if_then_else(add, col, 0)]), T.Cast("int32", add), lane % 4,
                                *pairs, source_code=red16_source,
                            ))
                else:  # columns of 8-column groups i (even lanes) and i + 1 (odd), in pairs of groups
                    odd = T.meta_var(lane % 2)
                    for i2 in T.unroll(ACC // 8):
                        col = T.meta_var(n0 + i2 * 16 + odd * 8 + lane % 4 // 2 * 4)
                        for half in T.unroll(2):
                            first, second = T.meta_var((i2 * 8 + half * 2, i2 * 8 + 4 + half * 2))
                            add = T.meta_var(out_listed[half] and col < N)
                            T.evaluate(T.cuda.func_call(
                                RED_PAIRS, C.ptr_to([out_row[half], T.if_then_else(add, col, 0)]), T.Cast("int32", add), odd,
                                acc[first], acc[first + 1], acc[second], acc[second + 1], source_code=RED_SOURCE,
                            ))

    return main

