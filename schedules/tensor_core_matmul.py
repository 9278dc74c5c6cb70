"""Tensor-core dense tile for a gathered matmul: ``mma.sync`` fed by ``ldmatrix`` from shared memory.

The gather is an inlined stage of the global->shared copy, so SRead costs an index load per
row and nothing else: the tile itself is the plain dense tensor-core pipeline. Built from TVM's
own schedule primitives and registered tensor intrinsics (``tvm.s_tir.tensor_intrin.cuda``);
float16 inputs with float32 accumulation, the pair TVM 0.27 registers ``mma`` intrinsics for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from tvm import s_tir
from tvm.target import Target

from .common import ScheduleTemplate, check

MMA = 16  # the m16n16k16 tile the intrinsics compute
GATHER_BLOCK = "Ag"  # the gather stage codegen names; inlined into the shared-memory copy


def _cuda_intrinsics():
    """TVM's CUDA tensor intrinsics, imported on first use: the import parses and registers
    several hundred of them (tens of seconds on a slow CPU), which ``import pit_compiler``
    must not pay."""
    from tvm.s_tir.tensor_intrin import cuda

    return cuda


def _fragment_layout(i, j):
    to_ldmatrix = _cuda_intrinsics().shared_16x16_to_ldmatrix_32x8_layout
    return (i // MMA, j // MMA, *to_ldmatrix(i % MMA, j % MMA))


class TensorCoreMatmul(ScheduleTemplate):
    """``C[i, j] = sum_k Ag[i, k] * B[k, j]`` over ``block_m x block_n`` tiles, one per thread block."""

    name = "tensor_core_matmul"
    version = 1

    @dataclass(frozen=True)
    class Knobs:
        block_m: int = 128
        block_n: int = 128
        block_k: int = 32
        warps_m: int = 2
        warps_n: int = 2
        fragments_m: int = 2  # 16x16 accumulators per warp along m held in registers at once
        fragments_n: int = 2

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

    def is_target_available(self, target: Target) -> bool:
        if target.kind.name != "cuda":
            return False
        arch = str(target.attrs.get("arch", ""))
        return arch.startswith("sm_") and int("".join(c for c in arch[3:] if c.isdigit()) or 0) >= 80

    def space(self, target: Target) -> Iterator[Knobs]:
        yield self.Knobs()
        for block_m, block_n, warps_m, warps_n in ((64, 128, 1, 2), (128, 64, 2, 1), (128, 256, 2, 4), (256, 128, 4, 2)):
            yield self.Knobs(block_m=block_m, block_n=block_n, warps_m=warps_m, warps_n=warps_n)
        yield self.Knobs(block_k=64)

    def apply(self, func, target: Target, knobs: Knobs) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        if names != {GATHER_BLOCK, "C"}:
            return None

        # Step 1. Tile the loops: 16x16x16 MMA tiles, grouped into warps and thread blocks.
        block = sch.get_sblock("C")
        i, j, k = sch.get_loops(block)
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

        # Step 2. Thread blocks over output tiles, warps within them.
        sch.bind(sch.fuse(i0, j0), "blockIdx.x")
        warp = sch.fuse(j1, i1)
        sch.bind(warp, "threadIdx.y")
        warps = knobs.warps_m * knobs.warps_n

        # Step 3. SRead: global -> shared copies, the row gather inlined into A's.
        for operand in (0, 1):
            shared = sch.cache_read(mma_block, operand, "shared")
            sch.compute_at(shared, k0)
            fused = sch.fuse(*sch.get_loops(shared)[-2:])
            _, ty, tx, vec = sch.split(fused, [None, warps, 32, 8])
            sch.bind(tx, "threadIdx.x")
            sch.bind(ty, "threadIdx.y")
            sch.vectorize(vec)
            sch.storage_align(shared, 0, axis=-2, factor=32, offset=8)
        sch.compute_inline(sch.get_sblock(GATHER_BLOCK))

        # Step 4. Shared -> registers with ldmatrix, accumulators in registers, stored by warps.
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

        # Step 5. Tensorize: every 16x16 piece becomes one intrinsic.
        for cached in (a_warp, b_warp):
            ri, rj = sch.get_loops(cached)[-2:]
            ri0, ri1 = sch.split(ri, [None, MMA])
            rj0, rj1 = sch.split(rj, [None, MMA])
            sch.reorder(ri0, rj0, ri1, rj1)
        sch.transform_layout(a_warp, ("write", 0), _fragment_layout)
        sch.transform_layout(b_warp, ("write", 0), _fragment_layout)
        sch.transform_layout(c_warp, ("read", 0), _fragment_layout)
        cuda = _cuda_intrinsics()
        sch.tensorize(sch.get_loops(a_warp)[-2], cuda.LDMATRIX_f16_A_INTRIN)
        sch.tensorize(sch.get_loops(b_warp)[-2], cuda.LDMATRIX_f16_B_INTRIN)
        sch.tensorize(sch.get_loops(block)[-3], cuda.MMA_f16f16f32_INTRIN)
        sch.tensorize(sch.get_loops(sch.get_sblock("C_init"))[-2], cuda.MMA_fill_16x16_f32_INTRIN)
        sch.tensorize(sch.get_loops(c_warp)[-2], cuda.MMA_store_16x16_f32_global_INTRIN)
        return sch
