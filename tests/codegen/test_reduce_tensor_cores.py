"""The reduce form on tensor cores: where it applies, that its workload computes the reduce form
(built for the CPU), that it builds for sm_90 with both gathers in the shared-memory copies,
and (on a GPU) that ``pit.sparse_matmul`` through it matches dense torch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import tvm
from tvm.target import Target

import pit_compiler as pit
from pit_compiler import ops
from pit_compiler.codegen.build import compile_primfunc
from pit_compiler.codegen.reduce_matmul import build_reduce_tile, fitting_knobs, reduce_tile_knobs, reduce_tile_space
from pit_compiler.ir import SparsityAttr, plan_pit
from pit_compiler.schedules.tensor_core_matmul import TensorCoreMatmul
from cuda_build import SM90, assert_compiles_for_sm90
from sparse_data import (
    assert_matches_reference,
    check_float32_out_from_mask,
    check_sparse_a,
    dense_operand,
    micro_tile_sparse,
    poisoned,
)

SM80 = Target({"kind": "cuda", "arch": "sm_80"})  # mma.sync's own GPUs: Hopper's run the warpgroup tile first


def reduce_plan(tile, K=256, N=384, a_transposed=False, b_transposed=False, form=None):
    contraction = ops.matmul_contraction(2, a_transposed, b_transposed)
    if a_transposed:
        tile = tile[::-1]
    return plan_pit(contraction, SparsityAttr("A", tile), {"m": 512, "n": N, "k": K}, form)


def knobs_for(tile=(32, 1), K=256, N=384, ndim=2, dtype="float16", out="float16", target=SM90, **plan):
    return reduce_tile_knobs(reduce_plan(tile, K, N, **plan), ndim, K, N, dtype, out, target)


def test_knobs_follow_the_micro_tile():
    knobs = knobs_for((32, 1))
    assert (knobs.block_m, knobs.block_n, knobs.block_k, knobs.vector_a) == (32, 128, 32, 1)
    knobs = knobs_for((64, 64), out="float32")
    assert (knobs.block_m, knobs.vector_a) == (64, 8)
    assert knobs_for((16, 8), N=320).block_n == 64  # N a multiple of 64 only


@pytest.mark.parametrize(
    "case",
    [
        dict(N=200),  # N not a multiple of 64
        dict(K=100),  # K not a multiple of 8: the 16-byte copies would be misaligned
        dict(tile=(8, 8)),  # 8-row blocks: less than one MMA tile
        dict(tile=(48, 1)),  # not a power-of-two row block
        dict(tile=(1, 16)),  # row pieces: the scatter form
        dict(tile=(32, 1), form="scatter"),
        dict(dtype="float32"),
        dict(dtype="bfloat16"),
        dict(out="bfloat16"),
        dict(ndim=3),
        dict(a_transposed=True),
        dict(b_transposed=True),
        dict(target=Target({"kind": "cuda", "arch": "sm_75"})),
        dict(target=Target("llvm")),
    ],
    ids=str,
)
def test_not_chosen_where_it_does_not_apply(case):
    assert knobs_for(**case) is None


@pytest.mark.parametrize("sparse,tile,form", [("B", (32, 1), "reduce"), ("B", (1, 32), None), ("C", (32, 32), None)], ids=str)
def test_not_chosen_for_other_sparse_operands(sparse, tile, form):
    plan = plan_pit(ops.matmul_contraction(2), SparsityAttr(sparse, tile), {"m": 512, "n": 384, "k": 256}, form)
    assert reduce_tile_knobs(plan, 2, 256, 384, "float16", "float16", SM90) is None


@pytest.mark.parametrize(
    "M,K,N,tile,out",
    [(64, 64, 64, (32, 1), "float32"), (40, 200, 64, (16, 24), "float32"), (100, 136, 128, (64, 64), "float16")],
    ids=str,
)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
def test_workload_computes_the_reduce_form(M, K, N, tile, out, density):
    """The unscheduled workload, built for the CPU and fed detection's index as the GPU path
    feeds it: gathers, zero padding, K and M tails."""
    bm, bk = tile
    executable = tvm.compile(build_reduce_tile(K, N, bm, bk, 32, out), target="llvm")
    A, mask = micro_tile_sparse((M, K), tile, density, torch.float16, seed=M + K)
    B = dense_operand((K, N), torch.float16, seed=N)
    index = ops.index_for(reduce_plan(tile, K, N), A, None, tile, tuple(mask.shape))
    rows = mask.shape[0] * bm
    C = torch.full((mask.shape[0], bm, N), float("nan"), dtype=getattr(torch, out))
    executable["main"](A, B, index.counts[0], index.indices[0], C)
    assert_matches_reference(C.view(rows, N)[:M], A.double() @ B.double())
    assert not C.view(rows, N)[M:].any(), "rows past M must be zero"


def cuda_source(K, N, tile, out):
    bm, bk = tile
    knobs = knobs_for(tile, K, N, out=out)
    executable = compile_primfunc(build_reduce_tile(K, N, bm, bk, knobs.block_k, out), SM90, knobs, template=TensorCoreMatmul())
    return executable.mod.imports[0].inspect_source()


@pytest.mark.parametrize("K,N,tile,out", [(512, 256, (32, 1), "float16"), (200, 192, (64, 64), "float32")], ids=str)
def test_builds_mma_with_both_gathers_in_the_shared_copies(K, N, tile, out, tmp_path):
    source = cuda_source(K, N, tile, out)
    assert "mma.sync" in source and "ldmatrix" in source
    # The gathered operands exist only in shared memory, loaded through the index.
    assert "Ag_shared_ptr" in source and "Bg_shared_ptr" in source
    assert "Ag_ptr" not in source and "Bg_ptr" not in source, "a gather stage was left in global memory"
    gathers = [line for line in source.splitlines() if "idx_ptr[" in line]
    assert any("A_ptr" in line for line in gathers) and any("B_ptr" in line for line in gathers)
    assert "int steps = " in source and "p_0_0 < (steps - 1)" in source, "the k loop does not stop at the row block's count"
    # Pipelined: B's rows (and A's pieces where they are 16-byte runs) arrive by cp.async,
    # the copy of the next k step in flight while this one computes.
    assert "cp.async.cg.shared.global" in source and "cp.async.wait_group 1" in source
    assert ("C_shared_dyn" in source) == (out == "float16"), "float16 output is cast from shared memory"
    assert_compiles_for_sm90(source, tmp_path, "reduce")


# ---------------------------------------------------------------------------------------------
# On a GPU: the whole path, pit.sparse_matmul -> detection -> the tensor-core tile.


@pytest.fixture
def taken(monkeypatch):
    """Whether each call took the tensor-core reduce path (the warpgroup tile, which Hopper
    runs first where it applies, is switched off: this is the mma.sync tile's test)."""
    monkeypatch.setattr(ops, "warpgroup_knobs", lambda *a: None)
    calls = []
    original = ops.run_reduce_on_tensor_cores
    monkeypatch.setattr(ops, "run_reduce_on_tensor_cores", lambda *a: calls.append(original(*a)) or calls[-1])
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(32, 1), (32, 32), (64, 64), (16, 8), (128, 16)], ids=str)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("M,K,N", [(256, 512, 384), (300, 200, 320), (1024, 2048, 512)], ids=str)
def test_sparse_A_on_tensor_cores(tile, density, M, K, N, taken):
    """Tails in M (padded copy) and K (partial last chunk), N a multiple of 64 not of 128."""
    check_sparse_a(tile, density, (M, K, N), torch.float16, "cuda", seed=M + tile[1])
    assert taken == [True], "the tensor-core reduce path did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(32, 1), (64, 64)], ids=str)
def test_float32_output_and_grid_mask(tile, taken):
    """float32 out (the accumulators stored directly), the index built from a micro-tile mask."""
    for halve in (False, True):
        check_float32_out_from_mask(tile, (320, 256, 256), 0.3, "cuda", halve)
    assert taken == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("K,N,tile", [(200, 200, (32, 1)), (100, 256, (32, 1)), (256, 200, (8, 8))], ids=str)
def test_falls_back_to_simt_where_the_tile_does_not_fit(K, N, tile, taken):
    M = 96
    A, _ = micro_tile_sparse((M, K), tile, 0.5, torch.float16, "cuda", seed=3)
    B = dense_operand((K, N), torch.float16, "cuda", seed=4)
    out = poisoned((M, N), torch.float16, "cuda")
    pit.sparse_matmul(A, B, micro_tile=tile, out=out)
    assert taken == [False]
    assert_matches_reference(out, A.double() @ B.double())


@pytest.mark.parametrize(
    "tile, dtype, N, path",
    [((32, 1), torch.float16, 384, "reduce"), ((64, 64), torch.float16, 384, "reduce"),
     ((1, None), torch.float16, 384, "row_gather"), ((32, 1), torch.float32, 384, None),
     ((32, 1), torch.float16, 100, None), ((1, 32), torch.float16, 384, None)],
    ids=str,
)
def test_tensor_core_path_names_the_kernel_that_runs(tile, dtype, N, path, monkeypatch):
    """What the tuner asks (``ops.tensor_core_path``) agrees with what ``pit_matmul`` runs."""
    monkeypatch.setattr(ops, "target_for", lambda device: SM80)
    M, K = 512, 256
    plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", (tile[0], tile[1] or K)), {"m": M, "n": N, "k": K})
    A, B, out = torch.empty(M, K, dtype=dtype), torch.empty(K, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    assert ops.tensor_core_path(plan, A, B, out) == path
    launched = []
    monkeypatch.setattr(ops, "reduce_tile_kernel", lambda *a: launched.append("reduce") or (lambda *args: None))
    blocks, chunks = math.ceil(M / tile[0]), math.ceil(K / (tile[1] or K))
    empty = ops.MicroTileIndex(torch.zeros(1, blocks, dtype=torch.int32), torch.zeros(1, blocks, chunks, dtype=torch.int32))
    # An empty index: the row gather answers it without a kernel; the reduce tile is looked up.
    assert ops.run_on_tensor_cores(plan, A, B, out, empty) == (path is not None)
    assert launched == (["reduce"] if path == "reduce" else [])


@pytest.mark.parametrize(
    "tile, dtype, cover, target",
    [((1, 32), torch.float16, (16, 32), SM80), ((1, 64), torch.float16, (16, 64), SM80), ((8, 8), torch.float16, (16, 8), SM90),
     ((1, 32), torch.float16, None, SM90), ((1, 64), torch.bfloat16, None, SM90), ((2, 16), torch.bfloat16, None, SM90),
     ((8, 16), torch.bfloat16, (32, 16), SM90), ((1, 4), torch.bfloat16, (32, 4), SM90),
     ((32, 1), torch.float16, None, SM90), ((1, 32), torch.float32, None, SM90), ((3, 5), torch.float16, None, SM90),
     ((1, None), torch.float16, None, SM90)],
    ids=str,
)
def test_tensor_core_cover_stacks_whole_micro_tiles(tile, dtype, cover, target, monkeypatch):
    """A micro-tile no tensor-core tile takes runs as the shortest stack of whole ones that one
    does; row pieces of k chunks 8 to 64 wide have their own kernel on Hopper (strips)."""
    monkeypatch.setattr(ops, "target_for", lambda device: target)
    M, K, N = 512, 256, 384
    plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", (tile[0], tile[1] or K)), {"m": M, "n": N, "k": K})
    A, B, out = torch.empty(M, K, dtype=dtype), torch.empty(K, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
    covered = ops.tensor_core_cover(plan, A, B, out)
    if cover is None:
        assert covered is plan
    else:
        assert (covered.form, covered.tile["m"], covered.tile["k"]) == ("reduce", *cover)
        assert ops.tensor_core_path(covered, A, B, out) == "reduce"


@pytest.mark.parametrize("tile", [(1, 32), (8, 8)], ids=str)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_covered_product_is_exact(tile, density, monkeypatch):
    """The cover's index is detected from A itself, so its blocks carry A's zeros: the product
    through the cover (run here by the CPU kernel, as the tensor-core tile needs a GPU) is A @ B."""
    covers = []
    original = ops.tensor_core_cover
    # Pretend this CPU has the tensor-core tile, then let the CPU kernel compute the cover's plan.
    monkeypatch.setattr(ops, "tensor_core_kernel", lambda plan, *a: "reduce" if plan.form == "reduce" and plan.tile["m"] % 16 == 0 else None)
    monkeypatch.setattr(ops, "run_on_tensor_cores", lambda *a, **k: False)
    monkeypatch.setattr(ops, "tensor_core_cover", lambda *a: covers.append(original(*a)) or covers[-1])
    A, _ = micro_tile_sparse((70, 96), tile, density, torch.float32, seed=5)
    B = dense_operand((96, 40), torch.float32, seed=6)
    result = pit.sparse_matmul(A, B, micro_tile=tile, out=torch.full((70, 40), float("nan")))  # poisoned
    assert covers and covers[0].tile["m"] == 16
    assert_matches_reference(result, A.double() @ B.double())


# The tuned space of the tile


def test_space_keeps_the_micro_tiles_rows_and_starts_at_the_defaults():
    for tile, N in [((32, 1), 4096), ((128, 16), 4096), ((16, 8), 192), ((64, 64), 320)]:
        default = knobs_for(tile, K=256, N=N)
        space = reduce_tile_space(default, N)
        assert space[0] == default and len(set(space)) == len(space) > 1
        for knobs in space:
            rows = (knobs.block_m, knobs.warps_m, knobs.fragments_m, knobs.vector_a)
            assert rows == (default.block_m, default.warps_m, default.fragments_m, default.vector_a), knobs
            assert N % knobs.block_n == 0 and knobs.block_k in (32, 64), knobs
            assert fitting_knobs(default, knobs, N) is knobs


def test_every_setting_builds_for_sm90(tmp_path):
    """Each knob setting the tuner may measure compiles to a cubin (ptxas enforces the shared
    memory and register limits), so tuning on a GPU spends no time on settings that cannot run."""
    K, N, tile = 256, 256, (32, 1)
    space = reduce_tile_space(knobs_for(tile, K, N), N)
    # 256 columns of 32 rows would not launch: their float32 staging and copies exceed 48 KiB
    assert {k.block_n for k in space} == {64, 128} and {k.stages for k in space} == {1, 2, 3}
    for number, knobs in enumerate(space):
        executable = compile_primfunc(build_reduce_tile(K, N, *tile, knobs.block_k, "float16"), SM90, knobs,
                                      template=TensorCoreMatmul())
        source = executable.mod.imports[0].inspect_source()
        assert "mma.sync" in source, knobs
        assert_compiles_for_sm90(source, tmp_path, f"reduce{number}", str(knobs))


def test_tuned_knobs_are_used_only_where_they_fit():
    default = knobs_for((32, 1), N=384)
    wider = dataclasses.replace(default, block_n=64, warps_n=2)
    assert fitting_knobs(default, wider, 384) is wider
    narrow = knobs_for((32, 1), N=320)
    assert fitting_knobs(narrow, dataclasses.replace(narrow, block_n=128, warps_n=4), 320) is narrow  # 320 % 128
    assert fitting_knobs(default, dataclasses.replace(wider, block_m=64, fragments_m=4), 384) is default  # other rows
    assert fitting_knobs(default, None, 384) is default


@pytest.mark.parametrize("fits", [True, False])
def test_run_time_takes_the_databases_knobs(fits, monkeypatch):
    """The reduce tile asks the tile database for its knobs (as the tuner stored them)."""
    from pit_compiler.tuning import cost_model

    monkeypatch.setattr(ops, "target_for", lambda device: SM90)
    M, K, N = 256, 256, 384
    plan = reduce_plan((32, 1), K, N)
    default = knobs_for((32, 1), K, N)
    tuned = dataclasses.replace(default, block_n=64, warps_n=2) if fits else dataclasses.replace(default, block_m=64, fragments_m=4, stages=1)
    asked, built = [], []
    monkeypatch.setattr(cost_model, "tuned_knobs", lambda plan, dtype, target, A, B, **kw: asked.append(kw) or tuned)
    monkeypatch.setattr(ops, "reduce_tile_kernel", lambda *a: built.append(a[-2]) or (lambda *args: None))  # (..., knobs, dtype)
    A, B, out = torch.empty(M, K, dtype=torch.float16), torch.empty(K, N, dtype=torch.float16), torch.empty(M, N, dtype=torch.float16)
    index = ops.MicroTileIndex(torch.zeros(1, M // 32, dtype=torch.int32), torch.zeros(1, M // 32, K, dtype=torch.int32))
    assert ops.run_reduce_on_tensor_cores(plan, A, B, out, index)
    assert asked[0]["template"].name == TensorCoreMatmul.name
    assert built == [tuned if fits else default]


# bfloat16: the tile builds, but TVM 0.27 writes B's ldmatrix.trans of bf16 as a faulty
# element-wise copy (illegal address on an H200), so run time keeps bfloat16 off these tiles.


def test_bfloat16_tile_builds_bf16_mma_for_sm90(tmp_path):
    K, N, (bm, bk) = 256, 256, (32, 32)
    knobs = knobs_for((bm, bk), K, N, dtype="bfloat16", out="bfloat16")
    assert knobs is not None
    executable = compile_primfunc(build_reduce_tile(K, N, bm, bk, knobs.block_k, "bfloat16", "bfloat16"), SM90, knobs,
                                  template=TensorCoreMatmul())
    source = executable.mod.imports[0].inspect_source()
    assert "bf16" in source and "mma.sync" in source and "ldmatrix" in source
    assert "f16.f16" not in source, "a float16 mma was left in the bfloat16 tile"
    assert_compiles_for_sm90(source, tmp_path, "reduce_bf16")


def test_bfloat16_stays_off_the_mma_sync_tiles(monkeypatch):
    """(Hopper's warpgroup tile reads B by descriptor, no ldmatrix: it takes bfloat16.)"""
    monkeypatch.setattr(ops, "target_for", lambda device: SM80)
    M, K, N = 256, 256, 384
    plan = reduce_plan((32, 1), K, N)
    rows = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", (1, K)), {"m": M, "n": N, "k": K})
    A, B, out = (torch.empty(shape, dtype=torch.bfloat16) for shape in ((M, K), (K, N), (M, N)))
    assert ops.tensor_core_path(plan, A, B, out) is None and ops.tensor_core_path(rows, A, B, out) is None
    assert ops.tensor_core_cover(plan_pit(plan.contraction, SparsityAttr("A", (1, 32)), {"m": M, "n": N, "k": K}),
                                 A, B, out).tile["m"] == 1  # no cover either


def test_bfloat16_ldmatrix_trans_is_still_miscompiled():
    """Fails once TVM emits the real ldmatrix.trans for bfloat16: then switch bfloat16 on."""
    K, N, (bm, bk) = 256, 256, (32, 32)
    knobs = knobs_for((bm, bk), K, N, dtype="bfloat16", out="bfloat16")
    executable = compile_primfunc(build_reduce_tile(K, N, bm, bk, knobs.block_k, "bfloat16", "bfloat16"), SM90, knobs,
                                  template=TensorCoreMatmul())
    source = executable.mod.imports[0].inspect_source()
    assert "ldmatrix.sync.aligned.m8n8.x4.trans" not in source
