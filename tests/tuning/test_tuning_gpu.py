"""The tuner and run-time selection on a CUDA GPU: CUDA-event timings, tuned knobs that run, auto."""

import pytest
import torch
from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig

import pit_compiler as pit
from pit_compiler.tuning import TileDatabase, set_tile_database, tune_matmul

from sparse_data import micro_tile_sparse

pytestmark = pytest.mark.gpu

FAST = EvaluatorConfig(number=1, repeat=2, min_repeat_ms=5, enable_cpu_cache_flush=False)
SHAPE = (200, 136, 264)  # M, N, K: no multiple of a tile


@pytest.fixture
def tuned_db(tmp_path):
    db = TileDatabase(tmp_path / "tiles.json")
    report = tune_matmul(
        SHAPE, "float16", [(32, 1), (1, 32), (1, None)], [0.5, 0.9], target="cuda", trials=4,
        database=db, evaluator=FAST, progress=False,
    )  # fmt: skip
    set_tile_database(db)
    yield db, report
    set_tile_database(None)


def test_cuda_tuning_measures_every_kernel_and_the_dense_fallback(tuned_db):
    db, report = tuned_db
    assert report.dense_ms > 0
    assert [k.form for k in report.kernels] == ["reduce", "scatter", "scatter"]
    for kernel in report.kernels:
        assert kernel.measured > 0 and kernel.failed == 0, kernel
        assert kernel.best_knobs is not None and kernel.detect_ms > 0
    assert all(m.ms > 0 for m in report.measurements if m.status == "measured")


@pytest.mark.parametrize("tile", [(32, 1), (1, 32), (1, None), (4, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_auto_runs_the_selected_kernel_with_tuned_knobs_correctly(tuned_db, tile, sparsity):
    M, N, K = SHAPE
    A, _ = micro_tile_sparse((M, K), tile, 1.0 - sparsity, torch.float16, "cuda")
    B = torch.randn(K, N, dtype=torch.float16, device="cuda")
    choice = pit.select_micro_tile(A, B)
    assert choice.source == "database" and set(choice.predicted_ms) >= {"32x1", "1x32", "1xall", "dense"}
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
    pit.sparse_matmul(A, B, micro_tile="auto", out=out)
    torch.testing.assert_close(out.float(), A.float() @ B.float(), atol=2e-2, rtol=2e-2)


def test_cuda_tuning_of_the_tensor_core_reduce_tile(tmp_path):
    """16x8 float16 blocks (too short for Hopper's warpgroup tile) with N a multiple of 64 run on
    the mma.sync reduce tile: its knob settings are what gets measured, each checked against
    torch, and run time then uses the best one correctly."""
    db = TileDatabase(tmp_path / "tiles.json")
    shape = (320, 256, 512)  # M, N, K
    report = tune_matmul(shape, "float16", [(16, 8)], [0.5, 0.9], target="cuda", trials=48, database=db,
                         evaluator=FAST, progress=False)
    (kernel,) = report.kernels
    assert kernel.failed == 0 and kernel.measured > 2, kernel
    assert {"block_n", "fragments_n", "block_k"} <= set(kernel.best_knobs), kernel.best_knobs
    M, N, K = shape
    A, _ = micro_tile_sparse((M, K), (16, 8), 0.2, torch.float16, "cuda", seed=3)
    B = torch.randn(K, N, dtype=torch.float16, device="cuda")
    set_tile_database(db)
    try:
        out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
        pit.sparse_matmul(A, B, micro_tile=(16, 8), out=out)
    finally:
        set_tile_database(None)
    torch.testing.assert_close(out.float(), A.float() @ B.float(), atol=2e-2, rtol=2e-2)


def test_auto_does_not_wait_for_the_gpu(tuned_db):
    """After a shape's first call (which counts every candidate), micro_tile="auto" decides by
    earlier calls' counts: with a second of GPU work queued ahead, the call returns at once."""
    M, N, K = SHAPE
    A, _ = micro_tile_sparse((M, K), (32, 1), 0.1, torch.float16, "cuda", seed=4)
    B = torch.randn(K, N, dtype=torch.float16, device="cuda")
    for _ in range(3):  # every kernel it runs loaded (a first load would wait for the GPU)
        pit.sparse_matmul(A, B, micro_tile="auto")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    out = pit.sparse_matmul(A, B, micro_tile="auto")
    assert not torch.cuda.current_stream().query(), "micro_tile='auto' waited for the GPU"
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), A.float() @ B.float(), atol=2e-2, rtol=2e-2)
