"""Hopper tensor-core tile: warpgroup MMA (``wgmma.mma_async``) on operands gathered into
swizzled shared memory.

Hopper's tensor cores run at full rate only through warpgroup MMA, which reads both operands
from shared memory by descriptor; ``mma.sync`` (:mod:`.tensor_core_matmul`) reaches about a
third of cuBLAS there. TVM 0.27 has no schedule that emits it (its tile primitives target
sm_100), so this kernel is written directly in TIRx, TVM's low-level dialect, from TVM's PTX
operations. What PIT needs of it:

- **SRead in the copies.** Each thread block gathers its operands with ``cp.async``, 16 bytes
  (8 elements) at a time, from wherever an :class:`Access` says they are: listed rows of A,
  listed k chunks of A and the matching rows of B. A copy that is not listed, or lies past an
  edge, is zero-filled, so tails and padding need no other code. (TMA cannot gather rows.)
  Chunks of k narrower than 8 columns, such as 32x1 pieces, are loaded from A element by
  element into the same layout, a step ahead, while the current step's MMAs run.
- **Layouts wgmma reads.** A's tile (``block_m`` rows x 64 positions of k, 128 bytes a row) and
  B's (64 positions x ``block_n`` columns, in panels of 64 columns) are stored with the 128-byte
  swizzle: 16-byte chunk ``c`` of a 128-byte row ``r`` lands at chunk ``c ^ (r % 8)``, so the
  copies and the MMA reads are free of bank conflicts. B is read transposed (MN-major); B
  stored ``(n, k)`` (an ``nn.Linear`` weight, ``b_k_major``) is laid out as A is, one 128-byte
  row of k per column, and read K-major, where its chunks of k are multiples of 8.
- **Pipeline.** ``stages`` shared-memory buffers; the copies of the next steps are in flight
  while the tensor cores work, and with ``overlap`` one step's MMAs still run while the next
  step's are issued.
- **Data-dependent k.** Each thread block runs its own number of k steps (its row block's
  listed chunks), read from the index on the device: no host sync.
- **SWrite in the epilogue.** Each thread writes its accumulators to the output row the
  :class:`Access` names (a scatter for gathered rows), cast to the output dtype.
- **Launch order** (knob ``row_tiles_first``): which tiles run at once, so which operand L2
  keeps (:func:`block_tile`).
- **Split k** (knob ``split_k``). Few thread blocks (a few gathered rows, each walking all of k)
  leave SMs idle; ``split_k`` thread blocks then share each tile's k steps, and each adds its
  partial sums to C with atomics (C zeroed before; float16 and bfloat16 outputs add in pairs,
  so the sum is rounded once per part).

Each of ``block_m / 64`` warpgroups (128 threads) owns 64 rows of the tile and issues
``wgmma.m64n{block_n}k16`` four times per k step. A tile of 32 rows (``block_m=32``: 32-row
blocks of A, whose k lists differ from block to block) is too short for wgmma's M of 64, so one
warpgroup computes it transposed, ``C^T = B^T A^T``: each 64-column panel of B, read MN-major,
is the M side of a ``wgmma.m64n32k16`` and A's 32 rows, read K-major, its N side; the same
copies fill the same buffers, and the epilogue stages the tile back untransposed. Inputs float16
or bfloat16, float32 accumulation, output of the input dtype or float32. Built for ``sm_90a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import check

INPUT_DTYPES = {"float16": "f16", "bfloat16": "bf16"}  # wgmma's operand type names
OUT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
OUTPUT_DTYPES = tuple(OUT_BYTES)
WARPGROUP = 128  # threads
WARPGROUP_ROWS = 64  # the M of every wgmma
TRANSPOSED_ROWS = 32  # block_m of the transposed tile: the N of its wgmma
BLOCK_K = 64  # positions of k per step: one 128-byte swizzled row of 16-bit elements
CHUNK = 8  # elements per 16-byte copy
MMA_K = 16  # the K of every wgmma
MAX_SHARED_BYTES = 227 * 1024  # what one thread block may opt in to on sm_90
REGISTERS_PER_SM = 64 * 1024
SWIZZLE_128B = 3  # the descriptor's layout code for the 128-byte swizzle
SWIZZLE_ATOM_BYTES = 1024  # eight 128-byte rows: the stride between row groups of 8
# wgmma descriptor strides, in 16-byte units: between row groups of 8, and between B's panels.
ROW_GROUP_STRIDE = SWIZZLE_ATOM_BYTES // 16
PANEL_STRIDE = BLOCK_K * 128 // 16
SPLITS = (1, 2, 3, 4, 6, 8)  # thread blocks per tile along k

# Per output dtype: the device function that adds 16 bytes of staged results to C, where split
# k's parts meet, and the element and the 4-byte unit it adds atomically (pairs of 16-bit values).
ATOMIC_ADD = {
    "float16": ("pit_add_f16x8", "half", "__half2"),
    "bfloat16": ("pit_add_bf16x8", "nv_bfloat16", "__nv_bfloat162"),
    "float32": ("pit_add_f32x4", "float", "float"),
}


def atomic_add_source(out_dtype: str) -> str:
    """CUDA source of :data:`ATOMIC_ADD`'s function for ``out_dtype``: four 4-byte atomic adds."""
    name, element, unit = ATOMIC_ADD[out_dtype]
    return f"""
__forceinline__ __device__ void {name}({element}* out, {element}* in) {{
    for (int i = 0; i < 4; ++i) atomicAdd(reinterpret_cast<{unit}*>(out) + i, reinterpret_cast<{unit}*>(in)[i]);
}}
"""


class Operands(NamedTuple):
    """The kernel's buffers and extents, as an :class:`Access` sees them."""

    A: tirx.Buffer  # (M, K)
    B: tirx.Buffer  # (K, N)
    Cnt: tirx.Buffer  # (Q,): listed chunks per row block (or one entry: listed rows)
    Idx: tirx.Buffer  # (Q, P): the chunks' numbers
    C: tirx.Buffer  # (M, N)
    M: tirx.PrimExpr
    Q: tirx.PrimExpr
    P: tirx.PrimExpr


@dataclass(frozen=True)
class Access:
    """Where one thread block's operands come from and where its rows go: TIR expressions of
    the operands and the block's row tile ``t`` (its position along the grid's rows).

    Rows and k positions are independent: A's element ``(r, p)`` is ``A[row(r), column(p)]``
    and B's row ``p`` is ``B[column(p)]`` (one function, ``k_source``, answers for both). Where
    ``k_run``, the positions that lie in one stored run of A, is a multiple of 8, A is copied 8
    positions at a time (asked at multiples of 8 only); else element by element. Row ``r`` of
    the tile is written to row ``row(r)`` of C. Each returns its place and whether it is listed
    and inside the operand.
    """

    name: str
    row_tiles: Callable[[Operands, int], tirx.PrimExpr]  # (ops, block_m) -> row tiles of the grid
    steps: Callable[[Operands, tirx.PrimExpr], tirx.PrimExpr]  # (ops, t) -> k steps of 64 positions
    row: Callable  # (ops, t, r) -> (row of A and C, listed) for tile row r
    k_source: Callable  # (ops, t, p) -> (column of A and row of B, listed) for position p
    k_run: int  # consecutive positions stored consecutively in A
    # Where A is a packed copy (its positions stored in place: column p): A's column for
    # position p, and A's width; by default ``k_source``'s column and K.
    a_source: Callable | None = None
    a_columns: int | None = None


class WarpgroupMatmul:
    """``C[row(t, r), n] = sum_p A[row(t, r), k(t, p)] * B[k(t, p), n]`` over ``block_m x block_n``
    tiles, ``row`` and ``k`` (``k_source``) from an :class:`Access`."""

    name = "warpgroup_matmul"
    version = 4  # 2: split k; 3: launch order; 4: the strips' 16-bit adds

    @dataclass(frozen=True)
    class Knobs:
        block_m: int = 128  # rows per thread block: 64 per warpgroup, or 32 on one (transposed)
        block_n: int = 256  # columns per thread block, in 64-column panels
        stages: int = 4  # shared-memory buffers of the k loop
        # Keep one step's MMAs in flight while the next step's are issued (the copies then
        # run stages - 2 steps ahead instead of stages - 1).
        overlap: bool = True
        # k chunks narrower than 8 columns: read a copy of A's listed pieces packed once per
        # call (copied 8 positions at a time) instead of gathering them in every thread block.
        pack_a: bool = False
        # Thread blocks per tile, each summing a share of its k steps into C with atomics.
        split_k: int = 1
        # Launch order: consecutive thread blocks take the row tiles of one column tile (the
        # blocks running at once then share B's column panel in L2) instead of the column tiles
        # of one row tile (which share A's rows, but each row tile reads its own listed rows of
        # B from memory). See :func:`block_tile`; the default order is the form's
        # (:meth:`WarpgroupMatmul.default`).
        row_tiles_first: bool = False
        # Strips only (:mod:`.warpgroup_strips`): add the chunks' partial sums to a C of the
        # inputs' 16-bit type, each add rounded, instead of to a float32 C that is cast after.
        adds16: bool = False

        def __post_init__(self):
            check(
                self.block_m in (TRANSPOSED_ROWS, 64, 128, 256),
                f"block_m must be 32 (one warpgroup, transposed), 64, 128 or 256 (1, 2 or 4 warpgroups), got {self.block_m!r}",
            )
            check(
                self.block_n % 64 == 0 and 64 <= self.block_n <= 256,
                f"block_n must be 64, 128, 192 or 256 (64-column panels, wgmma's N <= 256), got {self.block_n!r}",
            )
            check(self.stages >= (3 if self.overlap else 2), f"stages must be >= {3 if self.overlap else 2}, got {self.stages!r}")
            check(self.split_k in SPLITS, f"split_k must be one of {SPLITS}, got {self.split_k!r}")
            check(
                self.shared_bytes <= MAX_SHARED_BYTES,
                f"{self.stages} stages of a {self.block_m}x{self.block_n} tile need {self.shared_bytes} bytes "
                f"of shared memory, over {MAX_SHARED_BYTES}",
            )
            # The accumulators (float32) plus ~40 registers of addresses per thread.
            registers = (self.accumulators + 40) * self.threads
            check(
                registers <= REGISTERS_PER_SM,
                f"a {self.block_m}x{self.block_n} tile needs ~{registers} registers, over the SM's {REGISTERS_PER_SM}",
            )

        @property
        def transposed(self) -> bool:
            return self.block_m == TRANSPOSED_ROWS

        @property
        def threads(self) -> int:
            return max(self.block_m // WARPGROUP_ROWS, 1) * WARPGROUP

        @property
        def accumulators(self) -> int:
            """float32 accumulators per thread: a warpgroup's rows x block_n over its 128 threads."""
            return min(self.block_m, WARPGROUP_ROWS) * self.block_n // WARPGROUP

        @property
        def shared_bytes(self) -> int:
            """The pipeline's buffers, or the output staged in their place where that is more
            (float32, rows padded by 8)."""
            staged = self.block_m * (self.block_n + 8) * 4
            return max(self.stages * (self.block_m + self.block_n) * BLOCK_K * 2, staged)

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) in ("sm_90", "sm_90a")

    def default(self, block_m: int, narrow_k: bool = False, packed: bool = True, row_gather: bool = False) -> Knobs:
        """The setting for thread blocks of ``block_m`` rows: gathered rows (``row_gather``)
        or blocks of A (the reduce form).

        Shape, as measured on an H200 (8192^3, float16, 0 and 90 % sparse, column tiles first):
        128 rows run best 256 columns wide, 4 stages, MMAs overlapped (0.79 of cuBLAS on dense
        input); a lone warpgroup (64 rows) best 128 wide, 4 stages, not overlapped (0.44: each
        thread block reloads B for its 64 rows), which gathered rows keep; the transposed
        32-row tile 128 wide with 2 stages (0.25, 5 thread blocks per SM).

        ``narrow_k``: chunks of k narrower than 8 columns. On 32 rows, A's listed pieces packed
        once per call (``pack_a``) and 64 columns wide: 1.00 ms at 90 % (32x1 pieces), against
        1.19 packed at 128 or 256 columns and 1.52 gathered in every thread block (256 wide,
        the best without packing: 128 took 2.88). ``packed=False`` (a product too large to
        pack) gives the best unpacked setting; other heights are not measured packed.

        Launch order (:func:`block_tile`), H100, 8192^3 float16 at 90 %, tile alone, column
        tiles first against row tiles first: 32x1 pieces 1.072 against 0.813 ms (0.182 against
        0.170 at 99 %), 64x64 blocks 0.515 against 0.369, 32x32 0.946 against 0.721; but
        128x128 blocks 0.348 against 0.371, 128x16 0.406 against 0.494, and whole rows 0.297
        against 0.334. So blocks of 32 or 64 rows (row blocks that list different chunks of k)
        launch row tiles first; blocks of 128 rows and gathered rows (every row tile reads all
        of B) column tiles first; and so does A gathered element by element in every thread
        block (narrow chunks not packed), whose thread blocks of one row block then read A's
        scattered elements while they are in cache: 32x1 pieces at 99 %, gathered and 256 wide,
        took 0.92-0.94 ms through ``sparse_matmul`` row tiles first, against 0.46-0.54 column
        tiles first the session before. Row tiles first, 64x64 blocks ran best 256 columns wide
        with 2 stages: 0.323 ms at 90 % against 0.364 at 128 columns and 4 stages (1.440
        against 1.792 at 50 %, 0.089 against 0.100 at 99 %). Groups of 4 to 32 row tiles down
        each column tile, between the two orders, ran slower than the better of them in every
        case measured. (``benchmarks/results/tile-sweep-launch-order-session13-*.log`` and
        ``spmm-session13-*.log``.)
        """
        shape = self._default_shape(block_m, narrow_k, packed)
        gathers_a = narrow_k and not shape.pack_a  # element by element, in every thread block
        if row_gather or block_m > 64 or gathers_a:
            return shape
        if block_m == 64 and not narrow_k:
            shape = replace(shape, block_n=256, stages=2)
        return replace(shape, row_tiles_first=True)

    def _default_shape(self, block_m: int, narrow_k: bool, packed: bool) -> Knobs:
        if block_m == TRANSPOSED_ROWS:  # occupancy is what it lacks: double buffering only
            if narrow_k and packed:
                return self.Knobs(block_m=block_m, block_n=64, stages=2, overlap=False, pack_a=True)
            return self.Knobs(block_m=block_m, block_n=256 if narrow_k else 128, stages=2, overlap=False)
        if narrow_k and block_m <= 128:
            return replace(self._default_shape(block_m, False, packed), block_n=256)
        if block_m == 64:
            return self.Knobs(block_m=64, block_n=128, stages=4, overlap=False)
        return self.Knobs(block_m=block_m, block_n=256 if block_m <= 128 else 128)

    def space(self, block_m: int, first: Knobs | None = None, narrow_k: bool = False,
              any_height: bool = False) -> Iterator[Knobs]:
        """Every setting for thread blocks of ``block_m`` rows, ``first`` (default: the default)
        first; for ``narrow_k`` chunks each with A gathered and packed. ``any_height`` (gathered
        rows, which need no fixed row block): then the other heights' defaults at each width,
        the shorter tiles that fill more SMs where few rows are listed, and the 64-row ones
        with k split in 2 and 4 (more thread blocks still). Every setting launches in the
        default's order; last, the default at each width launched in the other order
        (:func:`block_tile`; for narrow chunks, gathered and packed)."""
        default = first or self.default(block_m, narrow_k, row_gather=any_height)
        order = dict(row_tiles_first=default.row_tiles_first)
        settings = [replace(knobs, pack_a=packed, **order) for packed in ((False, True) if narrow_k else (False,))
                    for knobs in self._settings(block_m)]
        if any_height:
            settings += [replace(knobs, **order) for height in (128, 64, TRANSPOSED_ROWS) if height != block_m
                         for knobs in self._widths(self.default(height, row_gather=True))]
            settings += [replace(knobs, split_k=split, **order) for knobs in self._widths(self.default(64, row_gather=True))
                         for split in (2, 4) if knobs.block_n <= 128]
        settings += [replace(knobs, row_tiles_first=not default.row_tiles_first, pack_a=packed) for knobs in self._widths(default)
                     for packed in ((False, True) if narrow_k else (default.pack_a,))]
        yield default
        yield from (knobs for knobs in settings if knobs != default)

    def _widths(self, knobs: Knobs) -> Iterator[Knobs]:
        for block_n in (256, 128, 64):
            try:
                yield replace(knobs, block_n=block_n)
            except ValueError:
                continue

    def _settings(self, block_m: int) -> Iterator[Knobs]:
        # The transposed tile is short of work per thread block: more of them per SM (fewer
        # stages, narrower) is what it needs; 5 and 6 stages ran slowest of all on an H200.
        transposed = block_m == TRANSPOSED_ROWS
        for block_n in (256, 128, 64) if transposed else (256, 128):
            for stages in (2, 3, 4) if transposed else (2, 3, 4, 5, 6):
                for overlap in (True, False):
                    try:
                        yield self.Knobs(block_m=block_m, block_n=block_n, stages=stages, overlap=overlap)
                    except ValueError:
                        continue

    def kernel(self, knobs: Knobs, K: int, N: int, dtype: str, out_dtype: str, access: Access,
               b_k_major: bool = False) -> tirx.PrimFunc:
        """``main(A, B, Cnt, Idx, C)`` computing ``access``'s product with ``knobs``; B stored
        ``(K, N)``, or with ``b_k_major`` ``(N, K)`` (an ``nn.Linear`` weight, read in place)."""
        check(dtype in INPUT_DTYPES, f"the warpgroup tile takes {sorted(INPUT_DTYPES)} inputs, got {dtype!r}")
        check(out_dtype in OUTPUT_DTYPES, f"the warpgroup tile writes {OUTPUT_DTYPES}, got {out_dtype!r}")
        check(K % CHUNK == 0 and N % CHUNK == 0, f"K and N must be multiples of {CHUNK} (16-byte rows), got {K}, {N}")
        check(not knobs.adds16, f"adds16 is a setting of the strips kernel only, got {knobs!r}")
        check(
            not (b_k_major and reads_k_elementwise(access)),
            f"B stored (n, k) needs runs of k that are multiples of {CHUNK} positions, got {access.name!r}",
        )
        return _kernel(knobs, K, N, dtype, out_dtype, access, b_k_major)


def block_tile(bid, row_tiles, tiles_n: int, split: int, row_tiles_first: bool) -> tuple:
    """``(row tile, column tile, part of k)`` of thread block ``bid`` (TIR expressions or ints).

    The parts of one tile are adjacent. By default the column tiles of one row tile follow each
    other: the thread blocks running at once share that row tile's A, and each row tile reads
    its listed rows of B again. With ``row_tiles_first`` the row tiles of one column tile follow
    each other: those running at once read one column panel of B (8192 x 256 half-precision
    values is 4 MiB), which stays in L2 while every row tile passes over it. Blocks of 32 or 64
    rows that list different k chunks (32x1 pieces, 64x64 blocks at random) reread a tenth of B
    per row tile at 90 %: at 8192^3 that counts 1.6 (64x64) to 3.3 GB (32x1) read by default,
    and their tile ran 1.46x slower on an H100 than on an H200 (32x1), the ratio of the two
    memories' bandwidths. Launched row tiles first, it ran 24-28 % faster on an H100 (see
    :meth:`WarpgroupMatmul.default`), where whole rows, which read all of B in every row tile
    anyway, ran 12 % slower, and blocks of 128 rows, which reread B 4 times less, 7-22 %.
    """
    part, tile = bid % split, bid // split
    if row_tiles_first:
        return tile % row_tiles, tile // row_tiles, part
    return tile // tiles_n, tile % tiles_n, part


def swizzled(row, chunk):
    """Element offset of 16-byte chunk ``chunk`` of 128-byte row ``row`` under the 128-byte swizzle."""
    return row * BLOCK_K + (chunk ^ row % 8) * CHUNK


def b_copy(copy, block_n: int, k_major: bool) -> tuple:
    """``(p, n, offset)`` of 16-byte copy ``copy`` of a step's tile of B: its first k position
    ``p`` in the step, its first column ``n`` in the tile, and its element offset in shared
    memory. MN-major (B stored ``(k, n)``): 8 columns of position ``p``, in panels of 64
    columns (:func:`b_swizzled`). K-major (stored ``(n, k)``): 8 positions of column ``n``,
    the tile laid out as A's, one swizzled 128-byte row of k per column; consecutive copies
    read one column's 128 bytes."""
    if k_major:
        n, chunk = copy // (BLOCK_K // CHUNK), copy % (BLOCK_K // CHUNK)
        return chunk * CHUNK, n, swizzled(n, chunk)
    p, chunk_n = copy // (block_n // CHUNK), copy % (block_n // CHUNK)
    return p, chunk_n * CHUNK, b_swizzled(p, chunk_n)


def b_element(k, n, k_major: bool) -> list:
    """The indices of B's element ``(k, n)`` in its storage: ``[n, k]`` where it is K-major."""
    return [n, k] if k_major else [k, n]


def reads_k_elementwise(access: Access) -> bool:
    """Whether the 8 positions of one copy of A lie in different runs of k (chunks narrower
    than 8 columns): then A is loaded element by element, and B's rows only MN-major."""
    return access.k_run % CHUNK != 0


def b_swizzled(p, chunk_n):
    """Element offset, in a tile of B, of k position ``p``'s 16-byte chunk ``chunk_n``: B is
    stored MN-major in panels of 64 columns, each ``BLOCK_K`` swizzled 128-byte rows."""
    return chunk_n // 8 * BLOCK_K * 64 + swizzled(p, chunk_n % 8)


def _kernel(knobs, K: int, N: int, dtype: str, out_dtype: str, access: Access, b_k_major: bool):
    BM, BN, S = knobs.block_m, knobs.block_n, knobs.stages
    THREADS, ACC, TRANSPOSED = knobs.threads, knobs.accumulators, knobs.transposed
    PANELS = BN // 64  # 64-column panels of B: the M of one transposed wgmma each
    PANEL_ACC = 16  # a transposed wgmma's accumulators: 64 x 32 over 128 threads
    A_TILE, B_TILE = BM * BLOCK_K, BLOCK_K * BN  # elements per stage
    A_COPIES, B_COPIES = A_TILE // CHUNK // THREADS, B_TILE // CHUNK // THREADS  # per thread and step
    TILES_N = math.ceil(N / BN)
    STAGE_PITCH = BN + 8  # elements per row of the output staged in shared memory
    OUT_VECTOR = 16 // OUT_BYTES[out_dtype]  # elements per 16-byte store of C
    OUT_COPIES = BM * BN // OUT_VECTOR // THREADS
    AHEAD = S - 2 if knobs.overlap else S - 1  # steps whose copies are in flight
    SPLIT = knobs.split_k
    ELEMENTWISE = reads_k_elementwise(access)
    IN_FLIGHT = 1 if knobs.overlap else 0  # MMA groups left running after each step
    # B's descriptor and wgmma flag: K-major B (stored (n, k)) is described as A is (each k16
    # step 16 elements along a swizzled row) and read untransposed; MN-major B by panels.
    B_LEADING, B_K_STEP, B_TRANSPOSED = (1, MMA_K, 0) if b_k_major else (PANEL_STRIDE, MMA_K * 64, 1)
    shape = "m64n32k16" if TRANSPOSED else f"m64n{BN}k16"
    wgmma = f"wgmma.mma_async.sync.aligned.{shape}.f32.{INPUT_DTYPES[dtype]}.{INPUT_DTYPES[dtype]}"
    zero = T.uint32(0)
    full = T.uint32(16)

    @T.macro(hygienic=False)
    def load_a(step):
        """Element by element: this thread's A elements of ``step`` into registers (``a_next``)."""
        for e in T.unroll(CHUNK):
            col_e, in_e = T.meta_var(access.k_source(ops, t, (k_first + step) * BLOCK_K + tx % (BLOCK_K // CHUNK) * CHUNK + e))
            a_cols[e] = T.if_then_else(in_e, col_e, -1)
        for j in T.unroll(A_COPIES):
            for e in T.unroll(CHUNK):
                a_next[j * CHUNK + e] = T.if_then_else(
                    a_listed[j] and a_cols[e] >= 0, A[a_row[j], T.max(a_cols[e], 0)], T.Cast(dtype, 0)
                )

    @T.prim_func
    def main(a: T.handle, b: T.handle, cnt: T.handle, idx: T.handle, c: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        M, Q, P = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (M, access.a_columns or K), dtype, align=16)
        B = T.match_buffer(b, (N, K) if b_k_major else (K, N), dtype, align=16)
        Cnt = T.match_buffer(cnt, (Q,), "int32")
        Idx = T.match_buffer(idx, (Q, P), "int32")
        C = T.match_buffer(c, (M, N), out_dtype, align=16)
        ops = T.meta_var(Operands(A, B, Cnt, Idx, C, M, Q, P))
        T.device_entry()
        bid = T.cta_id([access.row_tiles(ops, BM) * TILES_N * SPLIT])
        tx = T.thread_id([THREADS])
        smem = T.alloc_buffer((knobs.shared_bytes // 2,), dtype, scope="shared.dyn", align=1024)
        acc = T.alloc_buffer((ACC,), "float32", scope="local")
        desc_a: T.uint64
        desc_b: T.uint64
        t, column_tile, part = T.meta_var(block_tile(bid, access.row_tiles(ops, BM), TILES_N, SPLIT, knobs.row_tiles_first))
        n0 = T.meta_var(column_tile * BN)
        group = T.meta_var(tx // WARPGROUP)
        # Split k: this thread block's share of the tile's steps, from step ``k_first`` on.
        all_steps: T.let[T.int32] = access.steps(ops, t)
        share: T.let[T.int32] = (all_steps + SPLIT - 1) // SPLIT
        k_first: T.let[T.int32] = part * share
        steps: T.let[T.int32] = T.max(T.min(share, all_steps - k_first), 0)
        # The rows this thread copies of A never change along k: found once. Each thread's
        # copies of a step share one chunk of k (THREADS is a multiple of 8).
        a_row = T.alloc_buffer((A_COPIES,), "int32", scope="local")
        a_listed = T.alloc_buffer((A_COPIES,), "bool", scope="local")
        for j in T.unroll(A_COPIES):
            row, listed = T.meta_var(access.row(ops, t, (j * THREADS + tx) // (BLOCK_K // CHUNK)))
            a_listed[j] = listed
            a_row[j] = T.if_then_else(listed, row, 0)
        a_cols = T.alloc_buffer((CHUNK,), "int32", scope="local")  # A's columns of this thread's copies, -1: none
        a_next = T.alloc_buffer((A_COPIES * CHUNK,), dtype, scope="local")  # element by element: the next step's A
        if ELEMENTWISE and steps > 0:
            load_a(0)
        b_row = T.alloc_buffer((B_COPIES,), "int32", scope="local")
        b_bytes = T.alloc_buffer((B_COPIES,), "uint32", scope="local")
        for s in T.serial(0, steps + AHEAD):
            # SRead: the copies of step s into buffer s % S. Their sources are read from the
            # index first, all together, then the copies issued (each cp.async orders memory,
            # so a load between two of them would wait for the one before).
            if s < steps:
                chunk = T.meta_var(tx % (BLOCK_K // CHUNK))
                if not ELEMENTWISE:
                    a_col, a_in = T.meta_var((access.a_source or access.k_source)(ops, t, (k_first + s) * BLOCK_K + chunk * CHUNK))
                    a_cols[0] = T.if_then_else(a_in, a_col, -1)
                for j in T.unroll(B_COPIES):  # b_row: the copy's row of B (k), or K-major its column
                    p, n_off, _ = T.meta_var(b_copy(j * THREADS + tx, BN, b_k_major))
                    row, listed = T.meta_var(access.k_source(ops, t, (k_first + s) * BLOCK_K + p))
                    inside = T.meta_var(listed and n0 + n_off < N)
                    b_row[j] = T.if_then_else(inside, row, 0)
                    b_bytes[j] = T.if_then_else(inside, full, zero)
                if ELEMENTWISE:  # the registers loaded a step before to shared memory (seen after the
                    # barrier), then the next step's loads, in flight while this step's MMAs run
                    for j in T.unroll(A_COPIES):
                        r = T.meta_var((j * THREADS + tx) // (BLOCK_K // CHUNK))
                        for e in T.unroll(CHUNK):
                            smem[s % S * A_TILE + swizzled(r, chunk) + e] = a_next[j * CHUNK + e]
                    if s + 1 < steps:
                        load_a(s + 1)
                else:
                    for j in T.unroll(A_COPIES):
                        r = T.meta_var((j * THREADS + tx) // (BLOCK_K // CHUNK))
                        copied = T.meta_var(a_listed[j] and a_cols[0] >= 0)
                        T.ptx["cp.async.cg.shared.global"](
                            smem.ptr_to([s % S * A_TILE + swizzled(r, chunk)]),
                            A.ptr_to([a_row[j], T.max(a_cols[0], 0)]),
                            16,
                            T.if_then_else(copied, full, zero),
                        )
                for j in T.unroll(B_COPIES):
                    _, n_off, offset = T.meta_var(b_copy(j * THREADS + tx, BN, b_k_major))
                    column = T.meta_var(T.if_then_else(b_bytes[j] > zero, n0 + n_off, 0))
                    T.ptx["cp.async.cg.shared.global"](
                        smem.ptr_to([S * A_TILE + s % S * B_TILE + offset]),
                        B.ptr_to(b_element(b_row[j], column, b_k_major)),
                        16,
                        b_bytes[j],
                    )
            T.ptx.cp.async_.commit_group()
            # The MMAs of step s - AHEAD, once its copies have landed.
            if s >= AHEAD:
                u = T.meta_var((s - AHEAD) % S)
                T.ptx.cp.async_.wait_group(AHEAD)
                T.ptx.fence.proxy.async_.shared__cta()  # cp.async wrote through the generic proxy
                T.cuda.cta_sync()
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(BLOCK_K // MMA_K):
                    # The first MMA of the tile overwrites the accumulators (scale-d 0): zeroing
                    # them before would make ptxas serialize the MMAs.
                    first = T.meta_var(s == AHEAD and kk == 0)
                    a_rows = T.meta_var(smem.ptr_to([u * A_TILE + group * WARPGROUP_ROWS * BLOCK_K + kk * MMA_K]))
                    T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), a_rows, 1, ROW_GROUP_STRIDE, SWIZZLE_128B)
                    # Transposed, one MMA per panel: B^T's 64 columns (MN-major, M side) times A^T
                    # (K-major, N side); else one over all of B's panels.
                    for panel in T.unroll(PANELS if TRANSPOSED else 1):
                        T.cuda.wgmma.encode_matrix_descriptor(
                            T.address_of(desc_b),
                            smem.ptr_to([S * A_TILE + u * B_TILE + panel * BLOCK_K * 64 + kk * B_K_STEP]),
                            B_LEADING, ROW_GROUP_STRIDE, SWIZZLE_128B,
                        )
                        if TRANSPOSED:
                            T.ptx[wgmma](
                                *[acc[panel * PANEL_ACC + i] for i in range(PANEL_ACC)], desc_b, desc_a, T.Not(first), 1, 1,
                                B_TRANSPOSED, 0,
                            )
                        else:
                            T.ptx[wgmma](*[acc[i] for i in range(ACC)], desc_a, desc_b, T.Not(first), 1, 1, 0, B_TRANSPOSED)
                T.ptx.wgmma.commit_group.sync.aligned()
                T.ptx.wgmma.wait_group.sync.aligned(IN_FLIGHT)
                T.cuda.cta_sync()  # every warpgroup is done with the buffer the next copies refill
        T.ptx.wgmma.wait_group.sync.aligned(0)
        if steps == 0:  # nothing listed: no MMA wrote the accumulators
            for i in T.unroll(ACC):
                acc[i] = T.float32(0)
        # SWrite, in two moves through shared memory (free now): the accumulators in wgmma's
        # layout (8 columns per 4 registers) to a row-major tile padded by 8 elements a row
        # against bank conflicts, then 16-byte pieces of whole rows to their rows of C.
        T.cuda.cta_sync()
        staged = T.decl_buffer((BM * STAGE_PITCH,), out_dtype, data=smem.data, scope="shared.dyn")
        # In wgmma's layout, register i * 4 + half * 2 + e of lane l holds row
        # (l // 32) * 16 + l % 32 // 4 + half * 8 and column i * 8 + l % 4 * 2 + e of its 64-row
        # result: a row of C, or, transposed, a column of C in one 64-column panel.
        for i in T.unroll(ACC // 4):
            lane = T.meta_var(tx % WARPGROUP)
            r = T.meta_var(group * WARPGROUP_ROWS + lane // 32 * 16 + lane % 32 // 4)
            for half in T.unroll(2):
                for e in T.unroll(2):
                    value = T.meta_var(T.Cast(out_dtype, acc[i * 4 + half * 2 + e]))
                    if TRANSPOSED:  # panel i // 4: C's row i % 4 * 8 + ..., its column panel * 64 + r + ...
                        row_of_c = T.meta_var(i % 4 * 8 + lane % 4 * 2 + e)
                        staged[row_of_c * STAGE_PITCH + i // 4 * 64 + r + half * 8] = value
                    else:
                        staged[(r + half * 8) * STAGE_PITCH + i * 8 + lane % 4 * 2 + e] = value
        T.cuda.cta_sync()
        for j in T.unroll(OUT_COPIES):
            r = T.meta_var((j * THREADS + tx) // (BN // OUT_VECTOR))
            col = T.meta_var((j * THREADS + tx) % (BN // OUT_VECTOR) * OUT_VECTOR)
            row, listed = T.meta_var(access.row(ops, t, r))
            if SPLIT == 1:
                if listed and n0 + col < N:
                    for e in T.vectorized(OUT_VECTOR):
                        C[row, n0 + col + e] = staged[r * STAGE_PITCH + col + e]
            elif listed and n0 + col < N and steps > 0:  # a part with no steps adds nothing
                T.evaluate(T.cuda.func_call(
                    ATOMIC_ADD[out_dtype][0], C.ptr_to([row, n0 + col]), staged.ptr_to([r * STAGE_PITCH + col]),
                    source_code=atomic_add_source(out_dtype),
                ))

    return main


def hopper_target(target: Target) -> Target:
    """``target`` with the ``sm_90a`` architecture wgmma needs (sm_90 lacks the instruction)."""
    if str(target.attrs.get("arch", "")) == "sm_90a":
        return target
    return Target({"kind": "cuda", "arch": "sm_90a"})
