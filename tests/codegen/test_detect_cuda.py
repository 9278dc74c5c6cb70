"""Fast detection: bit packing (checked on the CPU), the CUDA kernels built and laid out without
a GPU, and the CUDA kernels against torch on a GPU (order-insensitive: CUDA lists in any order)."""

from __future__ import annotations

import math
import re
import shutil
from unittest import mock

import pytest
import torch
from tvm import s_tir
from tvm.target import Target

import pit_compiler as pit
from pit_compiler import ops
from pit_compiler.codegen import build_detect, compile_primfunc, detect_kernel
from pit_compiler.codegen.detect import value_mask, word_dtype
from pit_compiler.ir import InvalidKnobs
from pit_compiler.runtime import KernelCache
from pit_compiler.schedules.detection import DetectionThreads, contiguous_lanes, plan_launch
from cuda_build import assert_compiles_for_sm90
from sparse_data import micro_tile_sparse

CUDA = Target({"kind": "cuda", "arch": "sm_90"})
LLVM = Target("llvm")
# The micro-tiles the project supports, as sparse_matmul takes them.
PROJECT_TILES = [(1, None), (32, 1), (1, 32), (1, 64), (32, 32), (64, 64)]
FLOATS = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def memory_cache():
    pit.set_kernel_cache(KernelCache(None))
    yield
    pit.set_kernel_cache(None)


def reference_grid(x: torch.Tensor, tile, blocked: str) -> torch.Tensor:
    """``(batch, blocks, chunks)`` non-empty micro-tiles of ``x`` (``None``: the whole axis)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, rows, cols = x3.shape
    tr, tc = (size if t is None else t for t, size in zip(tile, (rows, cols)))
    grid_rows, grid_cols = math.ceil(rows / tr), math.ceil(cols / tc)
    nonzero = torch.zeros(batch, grid_rows * tr, grid_cols * tc, dtype=torch.bool, device=x.device)
    nonzero[:, :rows, :cols] = x3.ne(0)  # NaN != 0: non-empty; -0.0 == 0: empty
    grid = nonzero.view(batch, grid_rows, tr, grid_cols, tc).any(dim=4).any(dim=2)
    return grid if blocked == "rows" else grid.transpose(1, 2)


def assert_lists(index, expected: torch.Tensor):
    """Every block's list holds exactly its non-empty chunks, each once, in any order."""
    counts, indices = index.counts, index.indices
    assert counts.dtype == indices.dtype == torch.int32
    assert tuple(indices.shape) == tuple(expected.shape)
    torch.testing.assert_close(counts, expected.sum(-1, dtype=torch.int32))
    # to_mask scatters each listed chunk; with the counts equal, a repeat or a stray entry
    # (out of range, or a slot past the count) would leave a listed chunk unmarked.
    assert torch.equal(index.to_mask(), expected)


def detect_whole(s: torch.Tensor, blocked: str) -> "pit.MicroTileIndex":
    """Detection with one block spanning the whole ``blocked`` axis (sparse_matmul's whole rows)."""
    permuted = "cols" if blocked == "rows" else "rows"
    tiles = {"rows": 1, "cols": 1}
    return ops.detect(ops.as_kernel_input(ops.batched(s)), ("batch", "rows", "cols"), blocked, permuted, tiles, True, "x")


# Packing (CPU)


@pytest.mark.parametrize(
    "dtype, shape, run, offset, pack",
    [
        (torch.float16, (2, 5, 64), 64, 0, 4),
        (torch.float16, (2, 5, 64), 32, 0, 4),
        (torch.float16, (2, 5, 64), 2, 0, 2),
        (torch.float16, (2, 5, 64), 1, 0, 1),
        (torch.float16, (2, 5, 66), 66, 0, 2),
        (torch.float16, (2, 5, 67), 67, 0, 1),
        (torch.bfloat16, (3, 8), 8, 2, 2),
        (torch.float32, (3, 8), 8, 0, 2),
        (torch.float32, (3, 8), 8, 1, 1),
        (torch.uint8, (4, 16), 16, 0, 8),
        (torch.float64, (4, 16), 16, 0, 1),
    ],
)
def test_as_words_packs_whole_micro_tiles(dtype, shape, run, offset, pack):
    storage = torch.zeros(math.prod(shape) + offset, dtype=torch.float32).to(dtype)
    s = storage[offset:].view(shape)
    words, got = ops.as_words(s, run)
    assert got == pack
    assert words.element_size() == s.element_size() * pack
    assert words.data_ptr() == s.data_ptr() and words.shape[-1] * pack == shape[-1]


@pytest.mark.parametrize(
    "dtype, pack, word, mask",
    [
        ("float16", 4, "int64", 0x7FFF7FFF7FFF7FFF),
        ("bfloat16", 1, "int16", 0x7FFF),
        ("float32", 2, "int64", 0x7FFFFFFF7FFFFFFF),
        ("uint8", 8, "int64", None),
        ("int32", 1, "int32", None),
    ],
)
def test_words_and_masks(dtype, pack, word, mask):
    """A float's word is non-empty by any bit but the sign bits; an integer's by any bit."""
    assert word_dtype(dtype, pack) == word
    assert value_mask(dtype, pack) == mask


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("cols", [64, 66, 67])
def test_packed_words_keep_nan_and_drop_negative_zero(dtype, cols):
    """A word of several elements is non-empty iff one of them is: NaN and inf are, -0.0 is not."""
    x = torch.zeros(6, cols, dtype=dtype)
    x[0, 5] = -0.0
    x[1, 2] = float("nan")
    x[2, cols - 1] = float("-inf")
    x[3, :] = -0.0
    x[4, 7] = torch.finfo(dtype).tiny / 2 if dtype != torch.bfloat16 else 1e-40  # subnormal
    for tile in [(1, cols), (1, 32), (2, 4), (1, 1)]:
        index = pit.detect_micro_tiles(x, tile)
        assert_lists(index, reference_grid(x, tile, "rows"))
    assert pit.detect_micro_tiles(x, (1, cols)).nnz == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bool])
@pytest.mark.parametrize("micro_tile", PROJECT_TILES + [(4, 8)], ids=str)
@pytest.mark.parametrize("blocked", ["rows", "cols"])
@pytest.mark.parametrize("cols", [128, 130])
def test_cpu_packed_detection(dtype, micro_tile, blocked, cols):
    """The CPU kernels read packed words too: every packing against the reference."""
    tile = tuple(cols if t is None else t for t in micro_tile)
    x, _ = micro_tile_sparse((2, 70, cols), tile, 0.5, torch.float32, seed=cols)
    x = x.to(dtype)
    assert_lists(pit.detect_micro_tiles(x, tile, blocked=blocked), reference_grid(x, tile, blocked))


@pytest.mark.parametrize("blocked", ["rows", "cols"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 40, 67), (2, 33, 128)])
def test_cpu_whole_axis(shape, blocked):
    x, _ = micro_tile_sparse(shape, (1, None) if blocked == "cols" else (None, 1), 0.5, torch.float16, seed=2)
    tile = (1, None) if blocked == "cols" else (None, 1)
    assert_lists(detect_whole(x, blocked), reference_grid(x, tile, blocked))


# The CUDA kernels, built here without a GPU


def launches(micro_tile, transposed: bool, M: int, K: int, dtype=torch.float16) -> list[dict]:
    """The detection kernels ``sparse_matmul`` asks for (arguments of ``detect_kernel``)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(dict(zip(("order", "blocked", "permuted", "blocked_tile", "permuted_tile", "dtype"), args))
                     | {"pack": kwargs["pack"], "one_pass": kwargs["one_pass"]})
        return lambda s, counts, indices: counts.zero_()  # an empty index: nothing to compute

    A = torch.zeros(K, M, dtype=dtype).t() if transposed else torch.zeros(M, K, dtype=dtype)
    with mock.patch.object(ops, "detect_kernel", spy), mock.patch.object(ops, "run_matmul", lambda *a: None):
        pit.sparse_matmul(A, torch.zeros(K, 8, dtype=dtype), micro_tile=micro_tile)
    assert len(calls) == 1
    return calls[0]


def cuda_detect(call: dict):
    """The CUDA form of the detection PrimFunc ``call`` asks for."""
    return build_detect(call["order"], call["blocked"], call["permuted"], call["blocked_tile"], call["permuted_tile"],
                        call["dtype"], atomic=True, pack=call["pack"])


def cuda_kernel(call: dict, knobs=None) -> str:
    """CUDA C of the detection for ``call``, scheduled by its template."""
    executable = compile_primfunc(cuda_detect(call), CUDA, knobs, template=DetectionThreads())
    return executable.mod.imports[0].inspect_source()


def planned_launch(call: dict, knobs=None):
    """The template's thread layout for ``call`` (its micro-tile's steps are in the flag loops)."""
    sch = s_tir.Schedule(cuda_detect(call))
    flag = sch.get_sblock("flag")
    extents = [sch.get(loop).extent for loop in sch.get_loops(flag)[-2:]]
    steps = [int(e.value) if hasattr(e, "value") else None for e in extents]
    return plan_launch(sch.get(flag), *steps, knobs or DetectionThreads.Knobs())


CUDA_CASES = [(tile, transposed) for tile in PROJECT_TILES for transposed in (False, True)]


def case_id(case):
    tile, transposed = case
    return f"{tile[0]}x{tile[1] or 'K'}" + ("-t" if transposed else "")


@pytest.fixture(scope="module")
def cuda_sources():
    """CUDA C of the detections of 4096x4096 float16 (and a 4093-wide one), by case."""
    return {
        (case, K): cuda_kernel(launches(*case, M=4096, K=K))
        for case in CUDA_CASES
        for K in (4096, 4093)
    }


@pytest.mark.parametrize("K", [4096, 4093])
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_detection_builds(cuda_sources, case, K):
    source = cuda_sources[(case, K)]
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", source))
    assert len(kernels) == 2  # zero the counts; flag and list
    assert "pit_append" in source and "atomicAdd" in source and "__match_any_sync" in source


@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_detection_reduces_across_threads_where_planned(cuda_sources, case):
    """A micro-tile shared by several threads must be combined (TVM skips it silently when the
    bindings are not affine); one read by one thread must not be."""
    launch = planned_launch(launches(*case, M=4096, K=4096))
    source = cuda_sources[(case, 4096)]
    shared = launch.lanes > 1 or launch.rows > 1
    assert ("__shfl" in source.replace("__shfl_sync(peers", "") or "red_buf" in source) == shared
    assert f"__launch_bounds__({launch.threads})" in source


# The launch layout of each project micro-tile at 4096x4096 float16 (what the report describes).
EXPECTED_LAUNCH = {
    # case: (pack, lanes, micro-tiles per block, rows per micro-tile, threads)
    "1xK": (4, 256, 1, 1, 256),
    "1xK-t": (1, 1, 32, 32, 1024),
    "32x1": (1, 1, 256, 1, 256),
    "32x1-t": (4, 8, 32, 1, 256),
    "1x32": (4, 8, 32, 1, 256),
    "1x32-t": (1, 1, 256, 1, 256),
    "1x64": (4, 16, 16, 1, 256),
    "1x64-t": (1, 1, 256, 1, 256),
    "32x32": (4, 8, 32, 1, 256),
    "32x32-t": (4, 8, 32, 1, 256),
    "64x64": (4, 16, 16, 1, 256),
    "64x64-t": (4, 16, 16, 1, 256),
}


@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_launch_layout(case):
    call = launches(*case, M=4096, K=4096)
    launch = planned_launch(call)
    got = (call["pack"], launch.lanes, launch.per_block, launch.rows, launch.threads)
    assert got == EXPECTED_LAUNCH[case_id(case)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_detection_compiles_with_nvcc(cuda_sources, case, tmp_path):
    """nvcc for sm_90 accepts the source; ptxas neither spills nor exceeds 64 registers a thread
    (full occupancy needs 32 at 2048 threads an SM; 64 still leaves half)."""
    report = assert_compiles_for_sm90(cuda_sources[(case, 4096)], tmp_path, "detect", flags=("-Xptxas", "-v"))
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    assert registers and max(registers) <= 64, report
    assert set(re.findall(r"(\d+) bytes spill stores", report)) == {"0"}, report


@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_two_stage_cuda_detection_builds(case):
    """The ascending listing still builds for CUDA (the tuner may time it); runs use the one-pass kernel."""
    call = launches(*case, M=512, K=512)
    kernel = detect_kernel(call["order"], call["blocked"], call["permuted"], call["blocked_tile"], call["permuted_tile"],
                           call["dtype"], CUDA, KernelCache(None), pack=call["pack"], one_pass=False)
    assert kernel is not None


def test_one_pass_detection_is_for_cuda_tensors_only():
    assert launches((32, 1), False, M=64, K=64)["one_pass"] is False  # CPU tensors: the ascending listing


def test_cuda_detection_uses_its_template():
    call = launches((32, 1), False, M=64, K=64)
    assert DetectionThreads().apply(cuda_detect(call), LLVM, DetectionThreads.Knobs()) is None
    ascending = build_detect(call["order"], call["blocked"], call["permuted"], 32, 1, "float16")
    assert DetectionThreads().apply(ascending, CUDA, DetectionThreads.Knobs()) is None


@pytest.mark.parametrize("knobs", list(DetectionThreads().space(CUDA)), ids=str)
def test_detection_space_builds(knobs):
    for case in [((32, 1), False), ((1, None), True), ((1, 32), False)]:
        assert "pit_append" in cuda_kernel(launches(*case, M=256, K=256), knobs)


@pytest.mark.parametrize("knobs", [dict(threads=48), dict(threads=2048), dict(tall_threads=16), dict(unroll=0)])
def test_detection_rejects_bad_knobs(knobs):
    with pytest.raises(InvalidKnobs):
        DetectionThreads.Knobs(**knobs)


@pytest.mark.parametrize("steps, threads, lanes", [(None, 256, 256), (1, 256, 1), (8, 256, 8), (12, 256, 8),
                                                   (16, 256, 16), (1024, 256, 256)])
def test_contiguous_lanes(steps, threads, lanes):
    assert contiguous_lanes(steps, threads) == lanes


# On a GPU: the one-pass CUDA detection against torch


def cuda_input(shape, tile, sparsity, dtype, seed=0):
    x, _ = micro_tile_sparse(shape, tile, 1.0 - sparsity, torch.float32, "cuda", seed=seed)
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("micro_tile", PROJECT_TILES + [(4, 8), (1, 1), (3, 5), (1, 48), (300, 1)], ids=str)
@pytest.mark.parametrize("blocked", ["rows", "cols"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_cuda_matches_torch(dtype, micro_tile, blocked, sparsity):
    """Odd extents (no multiple of any tile: tails, packed and unpacked words), and runs of words
    the threads of a micro-tile do not divide evenly ((3, 5), (1, 48), the tall (300, 1))."""
    shape = (3, 197, 261) if micro_tile != (300, 1) else (2, 611, 97)
    tile = tuple(size if t is None else t for t, size in zip(micro_tile, shape[-2:]))
    x = cuda_input(shape, tile, sparsity, dtype, seed=sum(tile))
    index = pit.detect_micro_tiles(x, tile, blocked=blocked)
    assert index.counts.is_cuda and index.indices.is_cuda
    assert_lists(index, reference_grid(x, tile, blocked))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocked", ["rows", "cols"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 300, 516), (1, 1000, 37)])
def test_cuda_whole_axis_matches_torch(dtype, blocked, sparsity, shape):
    tile = (1, None) if blocked == "cols" else (None, 1)
    x = cuda_input(shape, tile, sparsity, dtype, seed=shape[1])
    assert_lists(detect_whole(x, blocked), reference_grid(x, tile, blocked))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("micro_tile", PROJECT_TILES + [(1, 1)], ids=str)
def test_cuda_nan_inf_and_negative_zero(dtype, micro_tile):
    x = torch.zeros(2, 130, 131, dtype=dtype, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(5)
    spots = torch.randint(0, x.numel(), (40,), device="cuda", generator=generator)
    x.view(-1)[spots[:20]] = float("nan")
    x.view(-1)[spots[20:30]] = float("inf")
    x.view(-1)[spots[30:]] = -0.0
    tile = tuple(size if t is None else t for t, size in zip(micro_tile, x.shape[-2:]))
    for blocked in ("rows", "cols"):
        assert_lists(pit.detect_micro_tiles(x, tile, blocked=blocked), reference_grid(x, tile, blocked))
    assert_lists(detect_whole(x, "cols"), reference_grid(x, (1, None), "cols"))


@pytest.mark.gpu
@pytest.mark.parametrize("micro_tile", PROJECT_TILES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_cuda_large(micro_tile, sparsity):
    """4096x4096 float16, as the benchmark runs it: thousands of appends to each count."""
    tile = tuple(4096 if t is None else t for t in micro_tile)
    x = cuda_input((4096, 4096), tile, sparsity, torch.float16)
    for blocked in ("rows", "cols"):
        assert_lists(pit.detect_micro_tiles(x, tile, blocked=blocked), reference_grid(x, tile, blocked))
    for blocked, whole in (("cols", (1, None)), ("rows", (None, 1))):
        assert_lists(detect_whole(x, blocked), reference_grid(x, whole, blocked))


@pytest.mark.gpu
@pytest.mark.parametrize("micro_tile", PROJECT_TILES, ids=str)
@pytest.mark.parametrize("transposed", [False, True])
def test_cuda_sparse_matmul_index(micro_tile, transposed):
    """The index sparse_matmul builds on CUDA equals the one it builds on the CPU, as sets."""
    from pit_compiler.ir import SparsityAttr, plan_pit

    M, K = 300, 516
    tile = tuple(K if t is None else t for t in micro_tile)
    x, _ = micro_tile_sparse((M, K), tile, 0.5, torch.float16, seed=3)
    A = x.t().contiguous().t() if transposed else x
    storage, flipped = ops.storage(A)
    stored_tile = tile[::-1] if flipped else tile
    plan = plan_pit(ops.matmul_contraction(2, flipped), SparsityAttr("A", stored_tile), {"m": M, "n": 64, "k": K})
    on_cpu = ops.index_for(plan, storage, None, stored_tile, None)
    on_gpu = ops.index_for(plan, storage.cuda(), None, stored_tile, None)
    torch.testing.assert_close(on_gpu.counts.cpu(), on_cpu.counts)
    assert torch.equal(on_gpu.to_mask().cpu(), on_cpu.to_mask())
