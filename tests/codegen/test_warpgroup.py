"""Hopper's warpgroup tile: its knobs, which calls it serves, that it builds wgmma for sm_90a
without spills or serialized MMAs (on the CPU), and (on a GPU) that every form and knob
setting through it matches dense torch."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

import pytest
import torch
import tvm
from tvm.target import Target

import pit_compiler as pit
from pit_compiler import ops
from pit_compiler.codegen.warpgroup import (
    fitting_warpgroup_knobs,
    row_gather_knobs,
    warpgroup_kernel,
    warpgroup_knobs,
    warpgroup_space,
)
from pit_compiler.ir import InvalidKnobs, SparsityAttr, plan_pit
from pit_compiler.runtime import KernelCache, RecentCounts
from pit_compiler.schedules import warpgroup_strips
from pit_compiler.schedules.warpgroup_matmul import BLOCK_K, WarpgroupMatmul, block_tile, swizzled
from cuda_build import SM90, assert_compiles_for_sm90
from sparse_data import (
    assert_matches_reference,
    check_float32_out_from_mask,
    check_sparse_a,
    dense_operand,
    micro_tile_sparse,
    poisoned,
)

Knobs = WarpgroupMatmul.Knobs
# The defaults of blocks of A (the reduce form); those of 32 and 64 rows launch row tiles first:
ROWS_128 = Knobs()
ROWS_64 = Knobs(block_m=64, block_n=256, stages=2, overlap=False, row_tiles_first=True)  # a lone warpgroup's
ROWS_32 = Knobs(block_m=32, block_n=128, stages=2, overlap=False, row_tiles_first=True)  # the transposed tile's
NARROW_32 = replace(ROWS_32, block_n=64, pack_a=True)  # its default for chunks narrower than 8
GATHERED_32 = replace(ROWS_32, block_n=256, row_tiles_first=False)  # the same where A is not packed
# Gathered rows launch column tiles first: the default (``Knobs()``) and the shorter tile.
GATHER_64 = Knobs(block_m=64, block_n=128, stages=4, overlap=False)
STRIPS = Knobs(block_m=64, block_n=256, stages=4, overlap=False, row_tiles_first=True)  # row pieces of k chunks (1x32 ...)


def plan_for(tile, M=512, K=256, N=384, sparse="A", form=None, a_transposed=False, b_transposed=False):
    contraction = ops.matmul_contraction(2, a_transposed, b_transposed)
    tile = (tile[0], tile[1] or K)
    return plan_pit(contraction, SparsityAttr(sparse, tile[::-1] if a_transposed else tile), {"m": M, "n": N, "k": K}, form)


@pytest.mark.parametrize(
    "knobs, problem",
    [(dict(block_m=96), "block_m"), (dict(block_m=192), "block_m"), (dict(block_m=16), "block_m"), (dict(block_n=320), "block_n"), (dict(block_n=100), "block_n"),
     (dict(stages=2), "stages"), (dict(stages=1, overlap=False), "stages"),
     (dict(stages=6), "shared memory"), (dict(block_m=256, block_n=192, stages=3), "registers"),
     (dict(split_k=0), "split_k"), (dict(split_k=5), "split_k")],
    ids=str,
)
def test_knobs_refuse_what_cannot_launch(knobs, problem):
    with pytest.raises(InvalidKnobs, match=problem):
        Knobs(**knobs)


@pytest.mark.parametrize("row_tiles_first", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_each_thread_block_takes_one_part_of_one_tile(row_tiles_first, split):
    """The launch order: every (row tile, column tile, part of k) once; a tile's parts adjacent,
    then the next row tile of the column tile (row tiles first) or the next column tile."""
    row_tiles, tiles_n = 5, 7
    taken = [block_tile(bid, row_tiles, tiles_n, split, row_tiles_first) for bid in range(row_tiles * tiles_n * split)]
    assert sorted(taken) == [(t, c, p) for t in range(row_tiles) for c in range(tiles_n) for p in range(split)]
    assert taken[:split] == [(0, 0, part) for part in range(split)]
    assert taken[split] == ((1, 0, 0) if row_tiles_first else (0, 1, 0))


@pytest.mark.parametrize("block_m", [32, 64, 128])
def test_space_starts_at_the_default_and_keeps_the_rows(block_m):
    space = list(WarpgroupMatmul().space(block_m))
    assert space[0] == WarpgroupMatmul().default(block_m) == {32: ROWS_32, 64: ROWS_64, 128: ROWS_128}[block_m]
    assert len(set(space)) == len(space) > 8
    assert {k.block_m for k in space} == {block_m}
    assert warpgroup_space(space[0]) == space


def test_narrow_chunks_are_also_tried_packed():
    plan = plan_for((32, 1))
    default = warpgroup_knobs(plan, 2, 256, 384, "float16", "float16", "float16", SM90)
    space = warpgroup_space(default, plan)
    assert space[0] == default == NARROW_32 and len(set(space)) == len(space)
    plain, packed = [k for k in space if not k.pack_a], [k for k in space if k.pack_a]
    assert {replace(k, pack_a=False) for k in packed} == set(plain) and GATHERED_32 in plain
    assert WarpgroupMatmul().default(32, narrow_k=True, packed=False) == GATHERED_32
    assert not any(k.pack_a for k in warpgroup_space(ROWS_32, plan_for((32, 32))))


def test_gathered_rows_try_every_height_and_blocks_keep_theirs():
    """Gathered rows fill thread blocks of any height (shorter ones spread few listed rows over
    more SMs); a row block is its thread block's rows."""
    rows = plan_for((1, None))
    default = warpgroup_knobs(rows, 2, 256, 384, "float16", "float16", "float16", SM90)
    space = warpgroup_space(default, rows)
    assert space[0] == default == Knobs() and len(set(space)) == len(space)
    assert {k.block_m for k in space} == {128, 64, 32} and GATHER_64 in space
    assert replace(ROWS_32, row_tiles_first=False) in space and not any(k.row_tiles_first for k in space[:-3])
    assert fitting_warpgroup_knobs(default, ROWS_32, rows) == ROWS_32
    blocks = plan_for((64, 64))
    assert fitting_warpgroup_knobs(ROWS_64, ROWS_32, blocks) == ROWS_64  # not its rows
    assert fitting_warpgroup_knobs(ROWS_64, replace(ROWS_64, stages=2), blocks) == replace(ROWS_64, stages=2)
    assert fitting_warpgroup_knobs(ROWS_64, None, blocks) == ROWS_64


def test_strips_try_both_heights_and_keep_to_settings_they_have():
    """Row pieces of k chunks: one or two warpgroups, every width and 2 to 4 buffers, the
    default first, and the default's widths with 16-bit adds; a tuned setting of another
    kernel (a transposed tile, split k, a pack) is not taken, nor 16-bit adds by another kernel."""
    strips = plan_for((1, 32))
    space = warpgroup_space(STRIPS, strips)
    assert space[0] == STRIPS and len(set(space)) == len(space) == 24
    assert {k.block_m for k in space} == {64, 128} and {k.block_n for k in space} == {64, 128, 256}
    assert replace(STRIPS, row_tiles_first=False) in space
    assert [k for k in space if k.adds16] == [replace(STRIPS, block_n=n, adds16=True) for n in (256, 128, 64)]
    for knobs in space:
        warpgroup_strips.check_knobs(knobs)
    for other in (ROWS_32, replace(STRIPS, split_k=2), replace(STRIPS, pack_a=True)):
        assert fitting_warpgroup_knobs(STRIPS, other, strips) == STRIPS
    assert fitting_warpgroup_knobs(STRIPS, space[5], strips) == space[5]
    assert fitting_warpgroup_knobs(STRIPS, space[-1], strips) == space[-1]
    for plan, default in ((plan_for((1, None)), Knobs()), (plan_for((64, 64)), ROWS_64)):
        assert fitting_warpgroup_knobs(default, replace(default, adds16=True), plan) == default
    with pytest.raises(ValueError, match="adds16 is a setting of the strips kernel only"):
        WarpgroupMatmul().kernel(replace(ROWS_64, adds16=True), 256, 384, "float16", "float16", _access("reduce", (64, 64), 256, ROWS_64))


def test_swizzle_spreads_each_chunk_column_over_eight_rows():
    """The 128-byte swizzle: a row's 8 chunks stay in its 128 bytes, and the same chunk of 8
    consecutive rows lands in 8 different 16-byte bank groups (conflict-free copies and reads)."""
    for row in range(16):
        offsets = [swizzled(row, chunk) for chunk in range(8)]
        assert sorted(offsets) == [row * 64 + 8 * c for c in range(8)]
    for chunk in range(8):
        assert len({swizzled(row, chunk) % 64 for row in range(8)}) == 8


@pytest.mark.parametrize(
    "tile, kw, expected",
    [((64, 64), {}, ROWS_64), ((128, 8), {}, ROWS_128), ((64, 16), dict(dtype="bfloat16"), ROWS_64),
     ((64, 64), dict(out="float32"), ROWS_64), ((1, None), {}, Knobs()), ((4, None), dict(dtype="bfloat16"), Knobs()),
     ((32, 32), {}, ROWS_32), ((32, 8), dict(dtype="bfloat16"), ROWS_32), ((32, 1), {}, NARROW_32), ((16, 32), {}, None),
     ((64, 4), {}, replace(GATHER_64, block_n=256)), ((64, 64), dict(K=100), None), ((1, None), dict(N=100), None),
     ((64, 64), dict(dtype="float32"), None), ((64, 64), dict(b_dtype="bfloat16"), None), ((64, 64), dict(ndim=3), None),
     ((64, 64), dict(target=Target({"kind": "cuda", "arch": "sm_80"})), None), ((64, 64), dict(target=Target("llvm")), None),
     ((64, 64), dict(a_transposed=True), None), ((1, 32), dict(sparse="B"), None), ((32, 1), dict(form="scatter"), None),
     ((1, 32), {}, STRIPS), ((1, 64), dict(dtype="bfloat16", out="float32"), STRIPS), ((2, 8), {}, STRIPS), ((4, 24), {}, STRIPS),
     ((1, 4), {}, None), ((1, 72), {}, None), ((1, 32), dict(ndim=3), None)],
    ids=str,
)
def test_serves_blocks_of_32_64_or_128_rows_and_whole_rows(tile, kw, expected):
    K, N = kw.get("K", 256), kw.get("N", 384)
    dtype = kw.get("dtype", "float16")
    plan = plan_for(tile, K=K, N=N, sparse=kw.get("sparse", "A"), form=kw.get("form"), a_transposed=kw.get("a_transposed", False))
    knobs = warpgroup_knobs(plan, kw.get("ndim", 2), K, N, dtype, kw.get("b_dtype", dtype), kw.get("out", dtype), kw.get("target", SM90))
    assert knobs == expected
    if expected is not None:
        path = ops.tensor_core_kernel(plan, 2, K, N, dtype, dtype, kw.get("out", dtype), SM90)
        assert path == {"reduce": "reduce", "scatter": "strips" if plan.accumulate else "row_gather"}[plan.form]


@pytest.mark.parametrize(
    "form, shape, dtype, out, knobs",
    [("reduce", (64, 64), "float16", "float16", Knobs(block_m=64)),
     ("reduce", (128, 8), "bfloat16", "float32", Knobs(block_m=128, block_n=128, stages=5, overlap=False)),
     ("reduce", (32, 32), "float16", "float16", ROWS_32),
     ("reduce", (32, 8), "bfloat16", "float32", Knobs(block_m=32, block_n=256, stages=3)),
     ("reduce", (32, 1), "float16", "float16", NARROW_32),
     ("reduce", (32, 1), "bfloat16", "float32", replace(NARROW_32, pack_a=True)),
     ("reduce", (64, 4), "bfloat16", "bfloat16", Knobs(block_m=64, block_n=256, stages=3)),
     ("row_gather", (1,), "float16", "float16", Knobs()),
     ("row_gather", (4,), "bfloat16", "bfloat16", Knobs(block_m=64, block_n=128, stages=3)),
     ("row_gather", (1,), "float16", "float16", replace(ROWS_64, split_k=4)),
     ("reduce", (64, 64), "bfloat16", "float32", replace(ROWS_64, split_k=3)),
     ("reduce", (32, 1), "bfloat16", "bfloat16", replace(NARROW_32, split_k=2)),
     ("reduce", (32, 1), "float16", "float16", replace(NARROW_32, row_tiles_first=False)),
     ("reduce", (64, 64), "float16", "float32", replace(ROWS_64, row_tiles_first=False, split_k=2)),
     ("row_gather", (1,), "bfloat16", "bfloat16", Knobs(row_tiles_first=True)),
     ("strips", (1, 32), "float16", "float32", STRIPS),
     ("strips", (1, 64), "bfloat16", "float32", Knobs(block_m=128, block_n=128, stages=3, overlap=False)),
     ("strips", (2, 24), "float16", "float32", replace(STRIPS, block_n=64, stages=2, row_tiles_first=False)),
     ("strips", (1, 8), "bfloat16", "float32", Knobs(block_m=128, block_n=64, stages=2, overlap=False)),
     ("strips", (1, 32), "float16", "float16", replace(STRIPS, adds16=True)),
     ("strips", (1, 64), "bfloat16", "bfloat16", Knobs(block_m=128, block_n=64, stages=3, overlap=False, adds16=True))],
    ids=str,
)
def test_builds_warpgroup_mma_for_sm90a(form, shape, dtype, out, knobs, tmp_path):
    K, N = 520, 776  # not multiples of the tile: predicated copies and stores
    executable = warpgroup_kernel.__wrapped__(form, shape, K, N, dtype, out, SM90, KernelCache(tmp_path / "cache"), knobs)
    assert executable is not None
    if form == "strips":
        func = warpgroup_strips.kernel(knobs, K, N, *shape, dtype)
    else:
        func = WarpgroupMatmul().kernel(knobs, K, N, dtype, out, _access(form, shape, K, knobs))
    source = tvm.compile(tvm.IRModule({"main": func}), target=Target({"kind": "cuda", "arch": "sm_90a"}),
                         tir_pipeline="tirx").mod.imports[0].inspect_source()
    wgmma = {"float16": "f32.f16.f16", "bfloat16": "f32.bf16.bf16"}[dtype]
    n = 32 if knobs.transposed else knobs.block_n  # the transposed tile's N is A's 32 rows
    assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.{wgmma}" in source
    assert "cp.async.cg.shared.global" in source  # B's rows, and A's where its chunks are 8 wide
    assert ("atomicAdd" in source) == (knobs.split_k > 1)  # split k: the parts add to C
    assert ("red.global.add.v4.f32" in source) == (form == "strips" and not knobs.adds16)  # strips: the chunks add to C
    pairs = {"float16": "f16x2", "bfloat16": "bf16x2"}[dtype]
    assert (f"red.global.add.noftz.v4.{pairs}" in source) == knobs.adds16  # ... in 16 bits, 8 columns at a time
    report = assert_compiles_for_sm90(source, tmp_path, "warpgroup", form, flags=("-Xptxas", "-v"), arch="sm_90a")
    if report is not None:
        assert "0 bytes spill stores" in report, report
        assert "C751" not in report, f"ptxas serializes the MMAs: {report}"


@pytest.mark.parametrize(
    "form, shape, dtype, knobs",
    [("row_gather", (1,), "float16", Knobs()), ("row_gather", (4,), "bfloat16", GATHER_64),
     ("reduce", (64, 64), "bfloat16", ROWS_64), ("reduce", (128, 16), "float16", replace(ROWS_128, block_n=128, stages=3)),
     ("reduce", (32, 32), "float16", ROWS_32), ("reduce", (64, 24), "float16", replace(ROWS_64, split_k=2, row_tiles_first=False))],
    ids=str,
)
def test_builds_b_stored_n_by_k_read_k_major(form, shape, dtype, knobs, tmp_path):
    """B stored (n, k), an ``nn.Linear`` weight read in place: its tile is laid out as A's, each
    wgmma reads it untransposed (K-major: the transposed tile's M side too) through a
    descriptor of A's form, and sm_90a builds it without spills or serialized MMAs."""
    K, N = 520, 776
    executable = warpgroup_kernel.__wrapped__(form, shape, K, N, dtype, dtype, SM90, KernelCache(tmp_path / "cache"), knobs, True)
    assert executable is not None
    func = WarpgroupMatmul().kernel(knobs, K, N, dtype, dtype, _access(form, shape, K, knobs), b_k_major=True)
    source = tvm.compile(tvm.IRModule({"main": func}), target=Target({"kind": "cuda", "arch": "sm_90a"}),
                         tir_pipeline="tirx").mod.imports[0].inspect_source()
    wgmma_calls = [line for line in source.splitlines() if "tvm_builtin_ptx_wgmma" in line and "acc_ptr[0]" in line]
    assert wgmma_calls and all("_1_1_0_0(" in line for line in wgmma_calls)  # scale 1, 1; neither transposed
    assert "desc_b_ptr[0])), (&(smem_ptr" in source and ", 512, 64, 3);" not in source  # no MN-major panel stride
    assert f" * {K}) + b_row_ptr[0])]" in source and f"b_row_ptr[0] * {N})" not in source  # B[n, k], rows of K
    report = assert_compiles_for_sm90(source, tmp_path, "warpgroup_k_major", form, flags=("-Xptxas", "-v"), arch="sm_90a")
    if report is not None:
        assert "0 bytes spill stores" in report, report
        assert "C751" not in report, f"ptxas serializes the MMAs: {report}"


@pytest.mark.parametrize("block_n", [64, 128, 256])
@pytest.mark.parametrize("k_major", [False, True])
def test_each_copy_of_b_fills_its_own_place_of_the_tile(block_n, k_major):
    """The copies of one step's tile of B (``b_copy``) fill each 16-byte place of the tile once:
    MN-major, 8 columns of one k position in panels of 64 columns; K-major, 8 positions of one
    column, at the place A's tile keeps row ``n``'s chunk (``swizzled``); consecutive copies
    read consecutive 16 bytes of B's storage."""
    from pit_compiler.schedules.warpgroup_matmul import b_copy, b_swizzled

    copies = [b_copy(c, block_n, k_major) for c in range(BLOCK_K * block_n // 8)]
    places = {offset for _, _, offset in copies}
    assert len(places) == len(copies) and all(offset % 8 == 0 and 0 <= offset < BLOCK_K * block_n for offset in places)
    for c, (p, n, offset) in enumerate(copies):
        if k_major:
            assert (p, n) == (c % 8 * 8, c // 8) and offset == swizzled(n, p // 8)
        else:
            assert (p, n) == (c // (block_n // 8), c % (block_n // 8) * 8) and offset == b_swizzled(p, n // 8)
    storage_order = [(n, p) if k_major else (p, n) for p, n, _ in copies]
    assert storage_order == sorted(storage_order)


def _access(form, shape, K, knobs):
    from pit_compiler.codegen.warpgroup import packed_access, reduce_access, row_gather_access

    if form == "reduce":
        return (packed_access if knobs.pack_a else reduce_access)(*shape, K)
    return row_gather_access(*shape, K, knobs.block_m)


# ---------------------------------------------------------------------------------------------
# On a Hopper GPU.


@pytest.fixture
def on_warpgroups(monkeypatch):
    """Whether each call ran the warpgroup tile."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warpgroup tile needs an sm_90 GPU (H100, H200)")
    calls = []
    original = ops.run_on_warpgroups
    monkeypatch.setattr(ops, "run_on_warpgroups", lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "tile", [(64, 64), (128, 8), (64, 24), (32, 32), (32, 8), (32, 1), (64, 4), (1, None), (4, None), (1, 32), (1, 64), (2, 16)],
    ids=str,
)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("M,K,N", [(1000, 520, 776), (256, 512, 384), (70, 64, 40)], ids=str)
def test_sparse_A_on_warpgroups(tile, density, M, K, N, dtype, on_warpgroups):
    check_sparse_a(tile, density, (M, K, N), dtype, "cuda", seed=M + (tile[1] or 0))
    assert on_warpgroups == [True], "the warpgroup tile did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(64, 64), (128, 16), (32, 16), (1, 32)], ids=str)
def test_float32_output_and_grid_mask(tile, on_warpgroups):
    """float32 out, the index built from a micro-tile mask that lists less than A holds."""
    check_float32_out_from_mask(tile, (330, 256, 264), 0.4, "cuda", halve=True)
    assert on_warpgroups == [True]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "block_m, tile",
    [(32, (32, 32)), (32, (32, 1)), (64, (64, 32)), (128, (128, 8)), (128, (1, None)), (64, (2, None)), (64, (1, 32)), (64, (2, 24))],
    ids=str,
)
def test_every_setting_the_tuner_tries_is_correct(block_m, tile, on_warpgroups):
    M, K, N = 300, 392, 520
    A, _ = micro_tile_sparse((M, K), tile, 0.5, torch.float16, "cuda", seed=11)
    B = dense_operand((K, N), torch.float16, "cuda", seed=12)
    plan = plan_for(tile, M, K, N)
    index = ops.index_for(plan, A, None, (tile[0], tile[1] or K), None)
    reference = A.double() @ B.double()
    space = warpgroup_space(warpgroup_knobs(plan, 2, K, N, "float16", "float16", "float16", SM90), plan)
    assert any(knobs.pack_a for knobs in space) == (tile[1] == 1)  # narrow chunks: packed too
    for knobs in space:
        out = poisoned((M, N), torch.float16, "cuda")
        assert ops.run_on_warpgroups(plan, A, B, out, index, knobs)
        assert_matches_reference(out, reference, adds=math.ceil(K / tile[1]) if knobs.adds16 else 0)
    assert on_warpgroups == [True] * len(space)


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("split", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "tile, knobs, dtype, out_dtype",
    [((1, None), ROWS_64, torch.float16, torch.float16), ((4, None), replace(ROWS_64, block_n=64), torch.bfloat16, torch.bfloat16),
     ((64, 64), ROWS_64, torch.float16, torch.float32), ((32, 1), NARROW_32, torch.bfloat16, torch.bfloat16),
     ((128, 8), Knobs(), torch.float16, torch.float16)],
    ids=str,
)
def test_split_k_parts_sum_to_the_product(tile, knobs, dtype, out_dtype, split, density, on_warpgroups):
    """Split k: each tile's thread blocks share its k steps (more parts than steps included:
    K = 392 is 7 steps) and add to C; against the float64 product, into a poisoned output, with
    nothing, half and everything listed."""
    check_knobs(tile, replace(knobs, split_k=split), dtype, out_dtype, density, seed=split)
    assert on_warpgroups == [True]


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize(
    "tile, knobs, dtype, out_dtype",
    [((1, None), Knobs(), torch.float16, torch.float16), ((4, None), replace(GATHER_64, block_n=64), torch.bfloat16, torch.bfloat16),
     ((64, 64), ROWS_64, torch.float16, torch.float32), ((32, 32), ROWS_32, torch.bfloat16, torch.bfloat16),
     ((32, 1), NARROW_32, torch.float16, torch.float16), ((32, 1), GATHERED_32, torch.bfloat16, torch.float32),
     ((128, 8), ROWS_128, torch.float16, torch.float16)],
    ids=str,
)
def test_the_other_launch_order_computes_every_tile(tile, knobs, dtype, out_dtype, split, density, on_warpgroups):
    """Launched in the order its setting does not take by default (row tiles first where that
    is column tiles first, and the reverse; alone and with split k), each tile is computed once,
    exactly."""
    flipped = replace(knobs, row_tiles_first=not knobs.row_tiles_first, split_k=split)
    check_knobs(tile, flipped, dtype, out_dtype, density, seed=20 + split)
    assert on_warpgroups == [True]


@pytest.fixture
def reading_b_as_stored(monkeypatch):
    """The warpgroup tile reads B stored (n, k) in place (``READS_B_AS_STORED``), and no compact
    copy of it may be made."""
    from pit_compiler.codegen import warpgroup

    monkeypatch.setattr(warpgroup, "READS_B_AS_STORED", True)
    monkeypatch.setattr(ops.COMPACT_COPIES, "get", lambda view: pytest.fail("made a compact copy of B"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", [(1, None), (4, None), (64, 64), (128, 8), (64, 24), (32, 32), (32, 8)], ids=str)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("M,K,N", [(1000, 520, 776), (70, 64, 40)], ids=str)
def test_a_linear_weight_is_read_k_major_on_warpgroups(tile, density, M, K, N, dtype, on_warpgroups, reading_b_as_stored):
    """``x @ W.t()``, W stored (out, in) as ``nn.Linear`` keeps it and read in place (K-major),
    against the float64 product, into a poisoned output, with tails in every dimension."""
    x, _ = micro_tile_sparse((M, K), tile, density, dtype, "cuda", seed=M + (tile[1] or 0))
    W = dense_operand((N, K), dtype, "cuda", seed=K)
    out = poisoned((M, N), dtype, "cuda")
    pit.sparse_matmul(x, W.t(), micro_tile=tile, out=out)
    assert_matches_reference(out, x.double() @ W.double().t())
    assert on_warpgroups == [True], "the warpgroup tile did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(1, None), (64, 64), (32, 32)], ids=str)
def test_every_setting_reads_a_linear_weight_k_major(tile, on_warpgroups, reading_b_as_stored):
    """Every setting the tuner tries for B stored (n, k) (split k and both launch orders
    among them), against the float64 product."""
    M, K, N = 300, 392, 520
    A, _ = micro_tile_sparse((M, K), tile, 0.5, torch.float16, "cuda", seed=14)
    W = dense_operand((N, K), torch.float16, "cuda", seed=15)
    plan = plan_for(tile, M, K, N, b_transposed=True)
    index = ops.index_for(plan, A, None, (tile[0], tile[1] or K), None)
    space = warpgroup_space(warpgroup_knobs(plan, 2, K, N, "float16", "float16", "float16", SM90), plan)
    for knobs in space:
        out = poisoned((M, N), torch.float16, "cuda")
        assert ops.run_on_warpgroups(plan, A, W, out, index, knobs)
        assert_matches_reference(out, A.double() @ W.double().t())
    assert on_warpgroups == [True] * len(space)


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize(
    "tile, knobs, dtype",
    [((1, 32), replace(STRIPS, adds16=True), torch.float16), ((1, 64), replace(STRIPS, block_m=128, block_n=128, adds16=True), torch.bfloat16),
     ((2, 24), replace(STRIPS, block_n=64, stages=2, adds16=True), torch.float16), ((1, 8), replace(STRIPS, adds16=True), torch.bfloat16)],
    ids=str,
)
def test_strips_add_in_16_bits_where_set(tile, knobs, dtype, density, on_warpgroups):
    """16-bit adds (eight columns a reduction, after the four lanes of a quad swap their pairs):
    each listed piece lands in its own columns of its own row, within one rounding per chunk
    of k of the float64 product."""
    check_knobs(tile, knobs, dtype, dtype, density, seed=31, adds=math.ceil(392 / tile[1]))
    assert on_warpgroups == [True]


def check_knobs(tile, knobs, dtype, out_dtype, density, seed, adds=0):
    """The warpgroup tile with ``knobs`` on a 300 x 392 x 520 product (tails everywhere), into
    a poisoned output, against the float64 product (``adds``: see ``assert_matches_reference``)."""
    M, K, N = 300, 392, 520
    A, _ = micro_tile_sparse((M, K), tile, density, dtype, "cuda", seed=seed)
    B = dense_operand((K, N), dtype, "cuda", seed=13)
    plan = plan_for(tile, M, K, N)
    index = ops.index_for(plan, A, None, (tile[0], tile[1] or K), None)
    out = poisoned((M, N), out_dtype, "cuda")
    assert ops.run_on_warpgroups(plan, A, B, out, index, knobs)
    assert_matches_reference(out, A.double() @ B.double(), adds)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(1, None), (1, 32)], ids=str)
def test_gathered_rows_need_no_host_read_under_graph_capture(tile, on_warpgroups):
    """Gathered rows (whole rows, and the rows of each chunk of k for strips) read their
    listed counts on the device: they run inside a CUDA graph."""
    M, K, N = 512, 256, 384
    A, _ = micro_tile_sparse((M, K), tile, 0.3, torch.float16, "cuda", seed=5)
    B = dense_operand((K, N), torch.float16, "cuda", seed=6)
    out = poisoned((M, N), torch.float16, "cuda")
    pit.sparse_matmul(A, B, micro_tile=tile, out=out, dense_fallback=False)  # builds outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pit.sparse_matmul(A, B, micro_tile=tile, out=out, dense_fallback=False)
    A2, _ = micro_tile_sparse((M, K), tile, 0.6, torch.float16, "cuda", seed=9)
    A.copy_(A2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert on_warpgroups[-1] is True
    assert_matches_reference(out, A2.double() @ B.double())


# ---------------------------------------------------------------------------------------------
# What every thread block gathers, computed on the CPU: the accesses the GPU kernel reads its
# operands through, evaluated by TVM (llvm) on PIT's own index, then used to form the product.


def evaluate_access(access, block_m: int, index, M: int, positions: int):
    """``(rows, rows_listed, sources, sources_listed, steps)`` of every thread block (sources
    for its first ``positions`` k positions), as numpy arrays: the access's expressions
    compiled for the CPU and run on ``index``."""
    from tvm import te, tirx

    from pit_compiler.schedules.warpgroup_matmul import Operands

    counts, indices = index.counts[0].numpy(), index.indices[0].numpy()
    Q, P = indices.shape
    Cnt, Idx = te.placeholder((Q,), "int32", name="Cnt"), te.placeholder((Q, P), "int32", name="Idx")
    ops = Operands(None, None, Cnt, Idx, None, tirx.const(M, "int32"), tirx.const(Q, "int32"), tirx.const(P, "int32"))
    tiles = int(access.row_tiles(ops, block_m))  # constants fold
    as_int = lambda condition: tirx.Cast("int32", condition)  # noqa: E731
    steps = te.compute((tiles,), lambda t: access.steps(ops, t), name="steps")
    rows = te.compute((tiles, block_m), lambda t, r: access.row(ops, t, r)[0], name="rows")
    rows_listed = te.compute((tiles, block_m), lambda t, r: as_int(access.row(ops, t, r)[1]), name="rows_listed")
    sources = te.compute((tiles, positions), lambda t, p: access.k_source(ops, t, p)[0], name="sources")
    listed = te.compute((tiles, positions), lambda t, p: as_int(access.k_source(ops, t, p)[1]), name="listed")
    outputs = [steps, rows, rows_listed, sources, listed]
    module = tvm.compile(te.create_prim_func([Cnt, Idx, *outputs]), target="llvm")
    arrays = [torch.from_numpy(counts.copy()), torch.from_numpy(indices.copy())]
    arrays += [torch.zeros([int(d) for d in o.shape], dtype=torch.int32) for o in outputs]
    module(*arrays)
    steps, rows, rows_listed, sources, listed = (a.numpy() for a in arrays[2:])
    return rows, rows_listed.astype(bool), sources, listed.astype(bool), steps


@pytest.mark.parametrize(
    "form, tile, M, K, N, density",
    [("reduce", (64, 64), 300, 520, 40, 0.4), ("reduce", (128, 8), 257, 96, 24, 0.3), ("reduce", (64, 24), 130, 200, 16, 1.0),
     ("reduce", (64, 64), 100, 128, 8, 0.0), ("reduce", (32, 32), 130, 200, 16, 0.5), ("reduce", (32, 1), 70, 90, 8, 0.3), ("row_gather", (1, None), 200, 136, 24, 0.3), ("row_gather", (4, None), 130, 64, 8, 0.5),
     ("row_gather", (1, None), 70, 72, 8, 0.0)],
    ids=str,
)
def test_each_thread_block_gathers_exactly_its_listed_operands(form, tile, M, K, N, density):
    """The gathers the kernel's copies read (``codegen.warpgroup``'s accesses), evaluated on the
    CPU from PIT's own detection and used to form the product block by block, give A @ B: every
    output row written once, every listed piece inside the thread block's k steps, nothing
    unlisted read (tails and the padding past each row block's count included)."""
    from pit_compiler.codegen.warpgroup import reduce_access, row_gather_access

    concrete = (tile[0], tile[1] or K)
    A, _ = micro_tile_sparse((M, K), concrete, density, torch.float32, seed=M + K)
    B = dense_operand((K, N), torch.float32, seed=N)
    plan = plan_for(tile, M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, concrete, None)
    block_m = tile[0] if form == "reduce" else 64
    access = reduce_access(*concrete, K) if form == "reduce" else row_gather_access(tile[0], K, block_m)
    # The furthest any thread block may step: all of a row block's chunks, or all of k.
    positions = math.ceil((index.indices.shape[-1] * concrete[1] if form == "reduce" else K) / 64) * 64
    rows, rows_listed, sources, listed, steps = evaluate_access(access, block_m, index, M, positions)
    assert (steps * 64 <= positions).all()
    result = torch.full((M, N), float("nan"), dtype=torch.float64)
    if form == "row_gather":
        result.zero_()  # as run time zeroes C before the kernel writes the listed rows
    written = []
    for t in range(len(steps)):
        taken = listed[t] & (np.arange(listed.shape[1]) < steps[t] * 64)
        if rows_listed[t].any():
            assert not (listed[t] & ~taken).any(), f"thread block {t} stops before a listed position"
        block_rows = torch.from_numpy(rows[t][rows_listed[t]]).long()
        columns = torch.from_numpy(sources[t][taken]).long()
        assert (columns >= 0).all() and (columns < K).all()
        result[block_rows] = A.double()[block_rows][:, columns] @ B.double()[columns]
        written += block_rows.tolist()
    assert len(written) == len(set(written)), "a row of C is written by two thread blocks"
    assert_matches_reference(result.float(), A.double() @ B.double())


@pytest.mark.parametrize(
    "tile, M, K, N, density, block_m",
    [((1, 32), 300, 200, 16, 0.3, 64), ((1, 64), 130, 136, 8, 0.9, 128), ((2, 24), 131, 72, 8, 0.5, 64),
     ((1, 8), 70, 40, 8, 1.0, 64), ((1, 32), 90, 64, 8, 0.0, 64)],
    ids=str,
)
def test_each_strip_tile_gathers_exactly_the_rows_its_chunk_lists(tile, M, K, N, density, block_m):
    """The strips kernel's row tiles (``warpgroup_strips.row_tiles`` and ``gathered_row``,
    evaluated on the CPU from PIT's own detection): each chunk's tiles gather every row it
    lists once and nothing else, and adding each tile's product over its chunk's columns to a
    zeroed C, as the kernel's atomics do, gives A @ B (tails of M, K and the last tile included)."""
    from tvm import te, tirx

    A, _ = micro_tile_sparse((M, K), tile, density, torch.float32, seed=M + K)
    B = dense_operand((K, N), torch.float32, seed=N)
    index = ops.index_for(plan_for(tile, M=M, K=K, N=N), A, None, tile, None)
    counts, indices = index.counts[0], index.indices[0]
    Q, P = indices.shape
    assert Q == math.ceil(K / tile[1])
    Cnt, Idx = te.placeholder((Q,), "int32", name="Cnt"), te.placeholder((Q, P), "int32", name="Idx")
    most = math.ceil(P * tile[0] / block_m)  # row tiles of a chunk listing every row
    row_of = lambda q, g: warpgroup_strips.gathered_row(Cnt, Idx, tirx.const(M, "int32"), tirx.const(P, "int32"), q, g, tile[0])  # noqa: E731
    tiles = te.compute((Q,), lambda q: warpgroup_strips.row_tiles(Cnt, q, tile[0], block_m), name="tiles")
    rows = te.compute((Q, most * block_m), lambda q, g: row_of(q, g)[0], name="rows")
    listed = te.compute((Q, most * block_m), lambda q, g: tirx.Cast("int32", row_of(q, g)[1]), name="listed")
    module = tvm.compile(te.create_prim_func([Cnt, Idx, tiles, rows, listed]), target="llvm")
    arrays = [counts.clone(), indices.clone(), torch.zeros(Q, dtype=torch.int32),
              torch.zeros(Q, most * block_m, dtype=torch.int32), torch.zeros(Q, most * block_m, dtype=torch.int32)]
    module(*arrays)
    tiles, rows, listed = arrays[2].numpy(), arrays[3].numpy(), arrays[4].numpy().astype(bool)
    result = torch.zeros(M, N, dtype=torch.float64)
    for q in range(Q):
        taken = listed[q] & (np.arange(most * block_m) < tiles[q] * block_m)
        assert not (listed[q] & ~taken).any(), f"chunk {q} stops before a listed row"
        chunk_rows = torch.from_numpy(rows[q][taken]).long()
        assert len(set(chunk_rows.tolist())) == len(chunk_rows), f"chunk {q} gathers a row twice"
        assert (chunk_rows >= 0).all() and (chunk_rows < M).all()
        columns = slice(q * tile[1], min((q + 1) * tile[1], K))
        nonzero = (A[:, columns] != 0).any(dim=1).nonzero().flatten()
        assert set(nonzero.tolist()) <= set(chunk_rows.tolist()), f"chunk {q} misses a row it lists"
        result[chunk_rows] += A.double()[chunk_rows, columns] @ B.double()[columns]
    assert_matches_reference(result.float(), A.double() @ B.double())


@pytest.mark.parametrize("tile, M, K, N, density", [((32, 1), 70, 90, 8, 0.3), ((32, 3), 64, 40, 16, 0.6),
                                                    ((64, 4), 130, 24, 8, 1.0), ((32, 1), 40, 16, 8, 0.0)], ids=str)
def test_packed_chunks_form_the_product(tile, M, K, N, density, tmp_path):
    """Narrow chunks with ``pack_a``: the pack kernel (run here on the CPU) copies each row
    block's listed chunks of A to position p's column; the tile reads A there in whole steps of
    64 (zeros past the listed ones, never NaN from the buffer) and B's rows through the reduce
    gather: block by block, that is A @ B."""
    from tvm.target import Target

    from pit_compiler.codegen.warpgroup import pack_kernel, packed_access, packed_columns

    A, _ = micro_tile_sparse((M, K), tile, density, torch.float32, seed=M + K)
    B = dense_operand((K, N), torch.float32, seed=N)
    index = ops.index_for(plan_for(tile, M=M, K=K, N=N), A, None, tile, None)
    width = packed_columns(tile[1], K)
    packed = torch.full((M, width), float("nan"))
    pack_kernel(*tile, K, "float32", Target("llvm"), KernelCache(tmp_path))(A, index.counts[0], index.indices[0], packed)
    access = packed_access(*tile, K)
    assert access.k_run == access.a_columns == width and width % 64 == 0
    rows, rows_listed, sources, listed, steps = evaluate_access(access, tile[0], index, M, width)
    a_columns, a_listed = evaluate_access(replace(access, k_source=access.a_source), tile[0], index, M, width)[2:4]
    positions = np.arange(width)
    result = torch.full((M, N), float("nan"), dtype=torch.float64)
    for t in range(len(steps)):
        taken = positions < steps[t] * 64
        assert (a_columns[t][taken] == positions[taken]).all()
        copied = taken & a_listed[t][positions - positions % 8]  # a 16-byte copy per 8 positions, by its first
        block_rows = torch.from_numpy(rows[t][rows_listed[t]]).long()
        a_block = torch.zeros(len(block_rows), width, dtype=torch.float64)
        a_block[:, copied] = packed.double()[block_rows][:, torch.from_numpy(copied)]
        b_rows = torch.zeros(width, N, dtype=torch.float64)
        b_rows[torch.from_numpy(taken & listed[t])] = B.double()[torch.from_numpy(sources[t][taken & listed[t]]).long()]
        result[block_rows] = a_block @ b_rows
    assert_matches_reference(result.float(), A.double() @ B.double())


KNOBS_OF_KEY = 8  # warpgroup_kernel(form, shape, K, N, dtype, out_dtype, target, cache, knobs, b_k_major)


def stub_warpgroup_tiles(monkeypatch) -> list:
    """From here on ops sees an sm_90 target with its kernels stubbed and fresh per-signature
    state: returns the knobs of each tile launched (the pack kernel does nothing). Called after
    the test's indices are detected (on the CPU)."""
    monkeypatch.setattr(ops, "target_for", lambda device: SM90)
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())
    monkeypatch.setattr(ops, "_COUNTED_TILES", {})
    monkeypatch.setattr(ops, "pack_kernel", lambda *key: lambda a, cnt, idx, ap: None)
    tiles = []
    monkeypatch.setattr(ops, "warpgroup_kernel", lambda *key: lambda a, b, cnt, idx, c: tiles.append(key[KNOBS_OF_KEY]))
    return tiles


@pytest.mark.parametrize("pack", [False, True])
def test_a_packed_setting_hands_the_tile_the_packed_copy(pack, monkeypatch):
    """Plumbing of ``pack_a`` (kernels stubbed, an sm_90 target): the pack kernel runs first on
    the call's index and the tile reads its output, ``packed_columns`` wide."""
    from pit_compiler.codegen.warpgroup import packed_columns

    M, K, N = 96, 40, 64
    A, B, out = torch.randn(M, K).half(), torch.randn(K, N).half(), torch.empty(M, N).half()
    plan = plan_for((32, 1), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (32, 1), None)  # detected on the CPU
    stub_warpgroup_tiles(monkeypatch)
    packs, tiles = [], []
    monkeypatch.setattr(ops, "pack_kernel", lambda *key: lambda a, cnt, idx, ap: packs.append((a, cnt, idx, ap)))
    monkeypatch.setattr(ops, "warpgroup_kernel", lambda *key: lambda a, b, cnt, idx, c: tiles.append((key, a)))
    knobs = replace(NARROW_32, pack_a=pack)
    assert ops.run_on_warpgroups(plan, A, B, out, index, knobs)
    (key, a_read), = tiles
    assert key[KNOBS_OF_KEY] == knobs
    if pack:
        (a, cnt, idx, packed), = packs
        assert a.data_ptr() == A.data_ptr() and torch.equal(cnt, index.counts[0]) and torch.equal(idx, index.indices[0])
        assert a_read is packed and packed.shape == (M, packed_columns(1, K)) == (M, 64)
    else:
        assert packs == [] and a_read.data_ptr() == A.data_ptr()


@pytest.mark.parametrize("out_dtype, zeroed", [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False),
                                               (torch.float32, True)], ids=str)
def test_strips_add_into_a_zeroed_float32_C_then_cast(out_dtype, zeroed, monkeypatch):
    """Plumbing of the strips (kernel stubbed by its CPU equivalent, an sm_90 target): the kernel
    gets a zeroed float32 C (the output itself where it is float32 and the caller did not zero
    it already, else a buffer), adds each chunk's gathered product to it, and a 16-bit output
    receives the cast sum; only a float32 output is zeroed ahead of detection by the caller."""
    M, K, N = 70, 96, 40
    dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float16
    A, _ = micro_tile_sparse((M, K), (1, 32), 0.4, dtype, seed=3)
    B = dense_operand((K, N), dtype, seed=4)
    plan = plan_for((1, 32), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (1, 32), None)  # detected on the CPU
    launched = emulate_strips(monkeypatch)  # checks the form and the float32 C it is built for
    out = torch.zeros(M, N, dtype=out_dtype) if zeroed else poisoned((M, N), out_dtype)
    assert ops.run_on_warpgroups(plan, A, B, out, index, zeroed=zeroed)
    (shape, C), = launched
    assert shape == (1, 32) and C.dtype == torch.float32
    assert (C is out) == (out_dtype == torch.float32)
    assert_matches_reference(out, A.double() @ B.double())
    route = ops._derive_route(A, B, out, "A", (1, 32), (M, 3), None, True, True, True)
    assert route.plan.accumulate and route.zeroes_output == (out_dtype == torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_strips_set_to_16_bit_adds_add_into_the_output_itself(dtype, reduced_precision_reductions, monkeypatch):
    """With ``adds16`` the strips add each chunk's product straight into the zeroed 16-bit
    output (each add rounded): no float32 C and no cast. The same setting adds into a float32
    C where PyTorch's switch for reduced-precision reductions of ``dtype`` is off, and where
    the output is float32 (the output itself)."""
    M, K, N = 70, 160, 40  # 5 chunks of 32 columns
    A, _ = micro_tile_sparse((M, K), (1, 32), 0.6, dtype, seed=5)
    B = dense_operand((K, N), dtype, seed=6)
    plan = plan_for((1, 32), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (1, 32), None)
    launched = emulate_strips(monkeypatch)
    for allowed, out_dtype, c_dtype in ((True, dtype, dtype), (False, dtype, torch.float32), (True, torch.float32, torch.float32)):
        reduced_precision_reductions(dtype, allowed)
        assert ops.reduced_precision_allowed(dtype) == allowed
        out = poisoned((M, N), out_dtype)
        assert ops.run_on_warpgroups(plan, A, B, out, index, replace(STRIPS, adds16=True))
        _, C = launched[-1]
        assert C.dtype == c_dtype and (C is out) == (out_dtype == c_dtype)
        assert_matches_reference(out, A.double() @ B.double(), adds=5)
    assert not ops.reduced_precision_allowed(torch.float32)


def detect_on_the_cpu(monkeypatch) -> None:
    """From here on ops sees an sm_90 target with its kernels stubbed (:func:`stub_warpgroup_tiles`)
    and detects on the CPU."""
    stub_warpgroup_tiles(monkeypatch)
    detect_kernel = ops.detect_kernel  # (order, blocked, permuted, tile, tile, dtype, target, ...)
    monkeypatch.setattr(ops, "detect_kernel", lambda *a, **k: detect_kernel(*a[:6], Target("llvm"), *a[7:], **k))


def emulate_strips(monkeypatch) -> list:
    """From here on ops sees an sm_90 target whose strips kernel is its CPU equivalent (any other
    warpgroup kernel fails the test) and whose detection runs on the CPU; returns the
    ``(shape, C)`` of each strips launch."""
    detect_on_the_cpu(monkeypatch)
    launched = []

    def kernel(form, shape, K, N, dtype, out_dtype, target, cache, knobs, b_k_major):
        assert not b_k_major  # strips read B stored (k, n)
        assert (form, out_dtype) == ("strips", warpgroup_strips.c_dtype(knobs, dtype)), (form, out_dtype)
        rows_per_chunk, bk = shape

        def strips(a, b, cnt, idx, c):  # chunk q adds its listed rows' product over its columns
            assert c.dtype == getattr(torch, out_dtype) and c.is_contiguous()
            launched.append((shape, c))
            for q in range(cnt.shape[0]):
                rows = (idx[q, : cnt[q]].long().view(-1, 1) * rows_per_chunk + torch.arange(rows_per_chunk)).flatten()
                rows = rows[rows < a.shape[0]]
                chunk = slice(q * bk, (q + 1) * bk)
                c[rows] = (c[rows].float() + a[rows, chunk].float() @ b[chunk].float()).to(c.dtype)  # rounded to C's type

        return strips

    monkeypatch.setattr(ops, "warpgroup_kernel", kernel)
    return launched


@pytest.mark.parametrize("reads_as_stored", [False, True])
@pytest.mark.parametrize("tile, k_major", [((1, None), True), ((64, 64), True), ((32, 8), True), ((32, 1), False), ((1, 32), False)],
                         ids=str)
def test_a_linear_weight_is_read_in_place_where_the_tile_reads_b_k_major(tile, k_major, reads_as_stored, monkeypatch):
    """``x @ W.t()`` on an sm_90 target (kernels stubbed): with ``READS_B_AS_STORED``, whole rows
    and blocks whose chunks of k are multiples of 8 read W itself, K-major, and no compact
    copy is made; narrow chunks (32x1) and strips read W's compact copy, as every tile does
    without it."""
    from pit_compiler.codegen import warpgroup
    from pit_compiler.runtime import CompactCopies

    M, K, N = 256, 128, 192
    x, _ = micro_tile_sparse((M, K), tile, 0.5, torch.float16, seed=3)
    W = dense_operand((N, K), torch.float16, seed=4)  # nn.Linear layout (out, in)
    monkeypatch.setattr(warpgroup, "READS_B_AS_STORED", reads_as_stored)
    detect_on_the_cpu(monkeypatch)
    launched = []
    monkeypatch.setattr(ops, "warpgroup_kernel", lambda *key: lambda a, b, cnt, idx, c: launched.append((key, b)))
    copies = CompactCopies(1 << 30)
    monkeypatch.setattr(ops, "COMPACT_COPIES", copies)
    made = []
    original = copies.get
    monkeypatch.setattr(copies, "get", lambda view: made.append(original(view)) or made[-1])
    pit.sparse_matmul(x, W.t(), micro_tile=tile, out=torch.empty(M, N, dtype=torch.float16))
    (key, b), = launched
    in_place = k_major and reads_as_stored
    assert key[KNOBS_OF_KEY + 1] == in_place
    assert (b.data_ptr(), tuple(b.shape)) == ((W.data_ptr(), (N, K)) if in_place else (made[0].data_ptr(), (K, N)))
    assert len(made) == (0 if in_place else 1)


@pytest.mark.parametrize(
    "sparse, tile, dtype, layout",
    [("A", (1, 32), torch.float16, "plain"), ("A", (2, 16), torch.bfloat16, "plain"), ("A", (1, 64), torch.float16, "b_transposed"),
     ("B", (32, 1), torch.float16, "b_transposed"), ("B", (64, 1), torch.bfloat16, "b_transposed")],
    ids=str,
)
def test_strips_serve_sparse_matmul_as_on_a_gpu(sparse, tile, dtype, layout, monkeypatch):
    """``pit.sparse_matmul`` on an sm_90 target (strips emulated on the CPU) sends row pieces of
    k chunks to the strips: of A, of A with B a transposed view (its compact copy), and of a
    pruned weight's transpose (B = W.t() with 32x1 pieces: 1x32 pieces of W, run as
    C^T = W A^T); the result, in the output's dtype, is A @ B."""
    M, K, N = 72, 104, 48
    shape = (M, K) if sparse == "A" else (K, N)
    S, _ = micro_tile_sparse(shape, tile, 0.4, dtype, seed=21)
    D = dense_operand((K, N) if sparse == "A" else (M, K), dtype, seed=22)
    A, B = (S, D) if sparse == "A" else (D, S)
    if layout == "b_transposed":
        B = B.t().contiguous().t()
    launched = emulate_strips(monkeypatch)
    out = poisoned((M, N), dtype)
    pit.sparse_matmul(A, B, sparse=sparse, micro_tile=tile, out=out)
    (strips_shape, C), = launched
    assert strips_shape == (tile if sparse == "A" else tile[::-1]) and C.dtype == torch.float32
    assert_matches_reference(out, A.double() @ B.double())


def test_a_product_too_large_to_pack_gathers_A(monkeypatch):
    """A packed copy past 32-bit indexing is not made: the default then runs its best gathered
    setting, a tuned packed one the same setting gathered."""
    M, K, N = 96, 40, 64
    A, B, out = torch.randn(M, K).half(), torch.randn(K, N).half(), torch.empty(M, N).half()
    plan = plan_for((32, 1), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (32, 1), None)
    tiles = stub_warpgroup_tiles(monkeypatch)
    monkeypatch.setattr(ops, "MAX_ELEMENTS", M * 64 - 1)
    monkeypatch.setattr(ops, "pack_kernel", lambda *key: pytest.fail("packed a copy too large"))
    tuned = replace(NARROW_32, stages=3)
    for knobs in (None, tuned):
        assert ops.run_on_warpgroups(plan, A, B, out, index, knobs)
    assert tiles == [GATHERED_32, replace(tuned, pack_a=False, row_tiles_first=False)]


@pytest.mark.parametrize(
    "rows, N, chosen",
    [(None, 8192, Knobs()), (82, 8192, GATHER_64), (410, 8192, Knobs()), (819, 8192, Knobs()),
     (41, 4096, replace(GATHER_64, block_n=64)), (410, 4096, GATHER_64), (0, 4096, replace(GATHER_64, block_n=64))],
    ids=str,
)
def test_few_gathered_rows_take_shorter_tiles(rows, N, chosen):
    """Where the default's thread blocks would fill under half of 132 SMs (each walks all of k),
    the first shorter tile whose blocks do: the H200's measured best in each of these cases."""
    assert row_gather_knobs(Knobs(), rows, N, 132) == chosen


def test_gathered_rows_pick_their_tile_from_an_earlier_calls_count(monkeypatch):
    """No host read: the first call of a signature runs the default tile, later ones the tile
    for the rows an earlier call listed; tuned knobs are kept as they are."""
    M, K, N = 512, 64, 4096
    A, B, out = torch.randn(M, K).half(), torch.randn(K, N).half(), torch.empty(M, N).half()
    A[40:] = 0  # 40 rows listed: 1 x 16 blocks of 128x256, 40 blocks of 64x64
    plan = plan_for((1, None), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (1, K), None)
    tiles = stub_warpgroup_tiles(monkeypatch)
    for knobs in (None, None, ROWS_32):
        assert ops.run_on_warpgroups(plan, A, B, out, index, knobs)
    assert tiles == [Knobs(), replace(GATHER_64, block_n=64), ROWS_32]


def test_under_graph_capture_gathered_rows_keep_the_tile_built_before(monkeypatch):
    """During a CUDA graph capture no kernel may be loaded and nothing read back: the captured
    call runs the tile of the signature's last call before it, and posts no count."""
    M, K, N = 512, 64, 4096
    A, B, out = torch.randn(M, K).half(), torch.randn(K, N).half(), torch.empty(M, N).half()
    A[40:] = 0
    plan = plan_for((1, None), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (1, K), None)
    many = ops.index_for(plan, torch.randn(M, K).half(), None, (1, K), None)  # every row listed
    tiles = stub_warpgroup_tiles(monkeypatch)
    ops.run_on_warpgroups(plan, A, B, out, index)  # rows not known yet: the default tile, built
    monkeypatch.setattr(ops, "capturing_graph", lambda device: True)
    monkeypatch.setattr(ops.RECENT_COUNTS, "post", lambda *a: pytest.fail("posted during a capture"))
    ops.run_on_warpgroups(plan, A, B, out, many)  # the 40 rows counted before would pick 64x64
    assert tiles == [Knobs(), Knobs()]


@pytest.mark.parametrize("density", [0.01, 0.1])
def test_narrow_chunks_run_packed_whatever_an_earlier_call_listed(density, monkeypatch):
    """32x1 pieces run packed, 64 wide and row tiles first on every call (on an H100 that beat
    gathering them 256 wide at 1 % and 3 % listed as well as at 10 %); tuned knobs are kept."""
    M, K, N = 256, 1024, 64
    A, _ = micro_tile_sparse((M, K), (32, 1), density, torch.float16, seed=3)
    B, out = torch.randn(K, N).half(), torch.empty(M, N).half()
    plan = plan_for((32, 1), M=M, K=K, N=N)
    index = ops.index_for(plan, A, None, (32, 1), None)
    tiles = stub_warpgroup_tiles(monkeypatch)
    for knobs in (None, None, replace(NARROW_32, stages=3)):
        assert ops.run_on_warpgroups(plan, A, B, out, index, knobs)
    assert tiles == [NARROW_32, NARROW_32, replace(NARROW_32, stages=3)]
