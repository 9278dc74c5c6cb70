"""Tensor-core dense tile for a gathered matmul: ``mma.sync`` fed by ``ldmatrix`` from shared memory.

The gathers are inlined stages of the global->shared copies, so SRead costs an index load per
row (or column) and nothing else: the tile itself is the plain dense tensor-core pipeline. Built
from TVM's own schedule primitives and tensor intrinsics (:mod:`.mma_intrinsics`): float16 or
bfloat16 inputs with float32 accumulation.

The workload this template takes (codegen writes it with ``te``):

- ``C``: ``C[*batch, i, j] = sum_k Ag[*batch, i, k] * Bg[*batch, k, j]`` in float32, with any
  leading batch axes (one thread block never spans two batches);
- ``Ag`` / ``Bg``: optional gather stages producing the operands, inlined into the copies;
- ``C_cast``: an optional cast of ``C`` to the output dtype, staged through shared memory;
- the function attribute ``pit.reduction_extent``: an :class:`~tvm.tirx.IndexMap` from the batch
  indices to how many leading positions of k may be non-zero (the rest are zero padding), so
  each thread block stops its k loop there: a data-dependent reduction on a static schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from tvm import s_tir, tirx
from tvm.target import Target

from .common import ScheduleTemplate, check
from .mma_intrinsics import INPUT_DTYPES, cuda_intrinsics, mma_intrinsics

MMA = 16  # the m16n16k16 tile the intrinsics compute
VECTOR = 8  # 16-bit elements per 16-byte copy
GATHER_BLOCK = "Ag"  # the gather stage of A codegen names; inlined into the shared-memory copy
GATHER_B_BLOCK = "Bg"  # the same for B
CAST_BLOCK = "C_cast"  # the output cast, read from the accumulators staged in shared memory
REDUCTION_EXTENT = "pit.reduction_extent"  # function attribute, see the module docstring
STATIC_SHARED_BYTES = 48 * 1024  # what a kernel may use without opting in to more
MAX_SHARED_BYTES = 227 * 1024  # what one thread block may opt in to on sm_90


def shared_memory_problem(block_m: int, block_n: int, block_k: int, stages: int) -> str | None:
    """Why a tile's shared memory would not launch, or None where it does.

    A and B are copied to static shared memory, ``stages`` copies of each (rows padded as
    ``storage_align`` pads them: to 8 past a multiple of 32 elements, against bank conflicts).
    A float16 output is staged as float32 in dynamic shared memory first. TVM's CUDA runtime
    opts a kernel in to more than 48 KiB only where its dynamic part alone reaches 48 KiB, so
    below that static and dynamic together must fit in 48 KiB. (Counted for every output
    dtype: knobs do not know it.)
    """

    def row(elements: int) -> int:
        return elements + (8 - elements) % 32

    copies = stages * 2 * (block_m * row(block_k) + block_k * row(block_n))
    staged = block_m * block_n * 4
    if copies > STATIC_SHARED_BYTES:
        return f"{stages} stages of copies need {copies} bytes of static shared memory, over {STATIC_SHARED_BYTES}"
    limit = STATIC_SHARED_BYTES if staged < STATIC_SHARED_BYTES else MAX_SHARED_BYTES
    if copies + staged > limit:
        return (
            f"{stages} stages of copies ({copies} bytes) and the {staged}-byte output staging exceed "
            f"the {limit} bytes it launches with"
        )
    return None


def _fragment_layout(*indices):
    """Leading (batch) indices kept; the last two tiled into ldmatrix's per-thread fragments."""
    *batch, i, j = indices
    to_ldmatrix = cuda_intrinsics().shared_16x16_to_ldmatrix_32x8_layout
    return (*batch, i // MMA, j // MMA, *to_ldmatrix(i % MMA, j % MMA))


def _cooperative_copy(sch: s_tir.Schedule, block, warps: int, vector: int = VECTOR) -> None:
    """All threads of the block copy its tile, ``vector`` elements per thread and step."""
    fused = sch.fuse(*sch.get_loops(block)[-2:])
    _, ty, tx, vec = sch.split(fused, [None, warps, 32, vector])
    sch.bind(tx, "threadIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.vectorize(vec)


def _bound_reduction(sch: s_tir.Schedule, k0, block_loop, extents: list, knobs) -> None:
    """Stop the k loop of each thread block where ``pit.reduction_extent`` says its batch's
    non-zero positions end. Applied last, on the finished schedule: skipped steps would only
    have added zeros, so no primitive before needs to see a data-dependent extent.

    The bound is a variable bound just before the loop: the software pipeline's waits are
    conditions on the loop's extent that TVM proves constant only against a variable (not a
    load), and CUDA's ``cp.async.wait_group`` takes constants only."""
    extent_map = sch.mod["main"].attrs.get(REDUCTION_EXTENT)
    if extent_map is None:
        return
    # blockIdx.x runs over (*batch, tiles of i, tiles of j): unravel the batch indices.
    *batch_extents, tiles_i, tiles_j = extents
    rest = tirx.floordiv(sch.get(block_loop).loop_var, tiles_i * tiles_j)
    indices = []
    for extent in reversed(batch_extents[1:]):
        indices.insert(0, tirx.floormod(rest, extent))
        rest = tirx.floordiv(rest, extent)
    indices.insert(0, rest)
    (positions,) = extent_map.map_indices(indices)
    loop = sch.get(k0)
    steps = tirx.Var("steps", "int32")
    bounded = tirx.For(loop.loop_var, loop.min, steps, loop.kind, loop.body, loop.thread_binding, loop.annotations)
    parent_sref = sch.get_sref(k0).parent
    parent = parent_sref.stmt
    assert isinstance(parent, tirx.For) and isinstance(parent.body, tirx.SeqStmt), "k0 sits in the warp loop's sequence"
    body = []
    for stmt in parent.body.seq:
        if stmt.same_as(loop):
            body += [tirx.Bind(steps, tirx.floordiv(positions + knobs.block_k - 1, knobs.block_k)), bounded]
        else:
            body.append(stmt)
    sch.state.replace(parent_sref, tirx.For(
        parent.loop_var, parent.min, parent.extent, parent.kind, tirx.SeqStmt(body), parent.thread_binding, parent.annotations
    ), {})


class TensorCoreMatmul(ScheduleTemplate):
    """``C[*b, i, j] = sum_k Ag[*b, i, k] * Bg[*b, k, j]`` over ``block_m x block_n`` tiles, one per thread block."""

    name = "tensor_core_matmul"
    version = 2

    @dataclass(frozen=True)
    class Knobs:
        block_m: int = 128
        block_n: int = 128
        block_k: int = 32
        warps_m: int = 2
        warps_n: int = 2
        fragments_m: int = 2  # 16x16 accumulators per warp along m held in registers at once
        fragments_n: int = 2
        # float16 elements per thread in A's shared-memory copy: 16 bytes where A's rows are read
        # in runs of 8 or more; fewer (a warp then covers more of one row) where the gather
        # picks single columns, which no vector load can fetch.
        vector_a: int = VECTOR
        # Shared-memory buffers of the k loop: 1 copies, waits, then computes each step; 2 or 3
        # fetch the next steps with cp.async while tensor cores work on this one.
        stages: int = 2

        def __post_init__(self):
            for name in ("block_m", "block_n", "block_k"):
                check(getattr(self, name) % MMA == 0, f"{name} must be a multiple of {MMA}, got {getattr(self, name)!r}")
            check(
                self.block_m % (MMA * self.warps_m * self.fragments_m) == 0,
                f"block_m={self.block_m} must split into warps_m={self.warps_m} x fragments_m={self.fragments_m} x {MMA}",
            )
            check(
                self.block_n % (MMA * self.warps_n * self.fragments_n) == 0,
                f"block_n={self.block_n} must split into warps_n={self.warps_n} x fragments_n={self.fragments_n} x {MMA}",
            )
            check(1 <= self.warps_m * self.warps_n <= 8, f"1 to 8 warps per block, got {self.warps_m * self.warps_n}")
            check(self.vector_a in (1, 2, 4, 8), f"vector_a must be 1, 2, 4 or 8, got {self.vector_a!r}")
            check(self.stages in (1, 2, 3, 4), f"stages must be 1 to 4, got {self.stages!r}")
            problem = shared_memory_problem(self.block_m, self.block_n, self.block_k, self.stages)
            check(problem is None, f"{self.block_m}x{self.block_n}x{self.block_k} tile: {problem}")

        def pipelined(self, stages: int = 2) -> "TensorCoreMatmul.Knobs":
            """These knobs with ``stages`` pipeline stages where their shared memory fits, else unpipelined."""
            fits = shared_memory_problem(self.block_m, self.block_n, self.block_k, stages) is None
            return replace(self, stages=stages if fits else 1)

    def is_target_available(self, target: Target) -> bool:
        if target.kind.name != "cuda":
            return False
        arch = str(target.attrs.get("arch", ""))
        return arch.startswith("sm_") and int("".join(c for c in arch[3:] if c.isdigit()) or 0) >= 80

    def space(self, target: Target) -> Iterator[Knobs]:
        yield self.Knobs()
        for block_m, block_n, warps_m, warps_n in ((64, 128, 1, 2), (128, 64, 2, 1), (128, 256, 2, 4), (256, 128, 4, 2)):
            yield self.Knobs(block_m=block_m, block_n=block_n, warps_m=warps_m, warps_n=warps_n, stages=1).pipelined()
        yield self.Knobs(block_k=64, stages=1).pipelined()

    def apply(self, func, target: Target, knobs: Knobs) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        gathers = [name for name in (GATHER_BLOCK, GATHER_B_BLOCK) if name in names]
        if "C" not in names or names - {"C", CAST_BLOCK, *gathers}:
            return None

        # Step 1. Tile the loops: 16x16x16 MMA tiles, grouped into warps and thread blocks.
        block = sch.get_sblock("C")
        input_dtype = str(sch.get(block).reads[0].source.dtype)  # A (or its gather stage)
        if input_dtype not in INPUT_DTYPES:
            return None
        *batch, i, j, k = sch.get_loops(block)
        i, i_mma = sch.split(i, [None, MMA])
        j, j_mma = sch.split(j, [None, MMA])
        k, k_mma = sch.split(k, [None, MMA])
        sch.reorder(i, j, k, i_mma, j_mma, k_mma)
        mma_block = sch.blockize(i_mma)
        per_warp_m = knobs.block_m // (MMA * knobs.warps_m * knobs.fragments_m)
        per_warp_n = knobs.block_n // (MMA * knobs.warps_n * knobs.fragments_n)
        i0, i1, i2, i3 = sch.split(i, [None, knobs.warps_m, per_warp_m, knobs.fragments_m])
        j0, j1, j2, j3 = sch.split(j, [None, knobs.warps_n, per_warp_n, knobs.fragments_n])
        k0, k1 = sch.split(k, [None, knobs.block_k // MMA])
        sch.reorder(i0, j0, j1, i1, k0, k1, i2, j2, i3, j3)

        # Step 2. Thread blocks over (batches and) output tiles, warps within them.
        tile_loops = [*batch, i0, j0]
        tile_extents = [sch.get(loop).extent for loop in tile_loops]
        block_loop = sch.fuse(*tile_loops)
        sch.bind(block_loop, "blockIdx.x")
        warp = sch.fuse(j1, i1)
        sch.bind(warp, "threadIdx.y")
        warps = knobs.warps_m * knobs.warps_n

        # Step 3. SRead: global -> shared copies, the gathers inlined into them.
        for operand in (0, 1):
            shared = sch.cache_read(mma_block, operand, "shared")
            sch.compute_at(shared, k0)
            _cooperative_copy(sch, shared, warps, knobs.vector_a if operand == 0 else VECTOR)
            sch.storage_align(shared, 0, axis=-2, factor=32, offset=8)
        for name in gathers:
            sch.compute_inline(sch.get_sblock(name))

        # Step 4. Shared -> registers with ldmatrix, accumulators in registers, stored by warps
        # (to global memory, or to shared memory for the cast's cooperative copy out).
        a_warp = sch.cache_read(mma_block, 0, "warp")
        b_warp = sch.cache_read(mma_block, 1, "warp")
        sch.compute_at(a_warp, k1)
        sch.compute_at(b_warp, k1)
        c_warp = sch.cache_write(mma_block, 0, "warp")
        sch.reverse_compute_at(c_warp, warp)
        ci, cj = sch.get_loops(c_warp)[-2:]
        ci0, ci1 = sch.split(ci, [None, MMA])
        cj0, cj1 = sch.split(cj, [None, MMA])
        sch.reorder(ci0, cj0, ci1, cj1)
        sch.decompose_reduction(mma_block, sch.get_loops(mma_block)[2])  # at k0
        if CAST_BLOCK in names:
            sch.set_scope(c_warp, 0, "shared.dyn")
            sch.storage_align(c_warp, 0, axis=-2, factor=32, offset=8)
            cast = sch.get_sblock(CAST_BLOCK)
            sch.reverse_compute_at(cast, block_loop)
            _cooperative_copy(sch, cast, warps)

        # Step 5. Tensorize: every 16x16 piece becomes one intrinsic.
        for cached in (a_warp, b_warp):
            ri, rj = sch.get_loops(cached)[-2:]
            ri0, ri1 = sch.split(ri, [None, MMA])
            rj0, rj1 = sch.split(rj, [None, MMA])
            sch.reorder(ri0, rj0, ri1, rj1)
        sch.transform_layout(a_warp, ("write", 0), _fragment_layout)
        sch.transform_layout(b_warp, ("write", 0), _fragment_layout)
        sch.transform_layout(c_warp, ("read", 0), _fragment_layout)
        intrinsics = mma_intrinsics(input_dtype)
        sch.tensorize(sch.get_loops(a_warp)[-2], intrinsics.ldmatrix_a)
        sch.tensorize(sch.get_loops(b_warp)[-2], intrinsics.ldmatrix_b)
        sch.tensorize(sch.get_loops(block)[-3], intrinsics.mma)
        sch.tensorize(sch.get_loops(sch.get_sblock("C_init"))[-2], intrinsics.fill)
        staged = CAST_BLOCK in names
        sch.tensorize(sch.get_loops(c_warp)[-2], intrinsics.store_shared if staged else intrinsics.store_global)

        # Step 6. Software pipelining: the copies of step k0 + stages - 1 are in flight
        # (cp.async) while step k0 computes.
        if knobs.stages > 1:
            sch.annotate(k0, "software_pipeline_stage", [0, 0, knobs.stages - 1])
            sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
            sch.annotate(k0, "software_pipeline_async_stages", [0])

        # Step 7. A data-dependent end of the reduction, per thread block.
        _bound_reduction(sch, k0, block_loop, tile_extents, knobs)
        return sch
