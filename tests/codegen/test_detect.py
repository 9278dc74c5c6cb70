"""Online detection of non-empty micro-tiles, checked against a dense torch reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pit_compiler as pit
from pit_compiler.runtime import KernelCache

TILES = [(1, 1), (32, 1), (1, 32), (4, 8)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


@pytest.fixture(scope="module", autouse=True)
def memory_cache():
    """Keep this module's kernels in memory, shared by its tests, and off the user's disk."""
    pit.set_kernel_cache(KernelCache(None))
    yield
    pit.set_kernel_cache(None)


def tile_extents(shape, micro_tile):
    """``micro_tile`` with ``None`` resolved to the whole axis (at least 1)."""
    return tuple(max(1, size) if t is None else t for t, size in zip(micro_tile, shape[-2:]))


def reference_grid(x: torch.Tensor, micro_tile, blocked: str) -> torch.Tensor:
    """The ``(batch, blocks, chunks)`` grid of non-empty micro-tiles, by padding and reshaping."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, rows, cols = x3.shape
    tr, tc = tile_extents(x3.shape, micro_tile)
    grid_rows, grid_cols = math.ceil(rows / tr), math.ceil(cols / tc)
    nonzero = torch.zeros(batch, grid_rows * tr, grid_cols * tc, dtype=torch.bool)
    nonzero[:, :rows, :cols] = x3.ne(0)  # NaN != 0: non-empty
    grid = nonzero.view(batch, grid_rows, tr, grid_cols, tc).any(dim=4).any(dim=2)
    return grid if blocked == "rows" else grid.transpose(1, 2)


def assert_matches_reference(index, x, micro_tile, blocked):
    expected = reference_grid(x, micro_tile, blocked)
    batch, blocks, chunks = expected.shape
    counts, indices = index.counts, index.indices
    assert counts.dtype == indices.dtype == torch.int32
    assert tuple(counts.shape) == (batch, blocks)
    assert tuple(indices.shape) == (batch, blocks, chunks)
    assert bool(((counts >= 0) & (counts <= chunks)).all()), counts
    torch.testing.assert_close(counts, expected.sum(-1, dtype=torch.int32))
    for b in range(batch):
        for q in range(blocks):
            listed = indices[b, q, : counts[b, q]]
            assert bool(((listed >= 0) & (listed < chunks)).all()), listed
            assert listed.tolist() == expected[b, q].nonzero().flatten().tolist(), (b, q)
    assert torch.equal(index.to_mask(), expected)
    assert index.nnz == int(expected.sum())


def sparse_input(shape, micro_tile, sparsity, *, seed=0, dtype=torch.float32):
    """``torch.randn`` data whose micro-tiles are zeroed at random with probability ``sparsity``."""
    generator = torch.Generator().manual_seed(seed)
    tr, tc = tile_extents(shape, micro_tile)
    *batch, rows, cols = shape
    grid = (*batch, math.ceil(rows / tr), math.ceil(cols / tc))
    kept = torch.rand(grid, generator=generator) >= sparsity
    kept = kept.repeat_interleave(tr, dim=-2).repeat_interleave(tc, dim=-1)[..., :rows, :cols]
    x = torch.randn(shape, generator=generator) * kept
    return kept if dtype == torch.bool else x.to(dtype)


# Agreement with the reference


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.sampled_from([None, 1, 3]),
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    micro_tile=st.sampled_from(TILES),
    blocked=st.sampled_from(["rows", "cols"]),
    sparsity=st.sampled_from(SPARSITIES),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(batch, rows, cols, micro_tile, blocked, sparsity, seed):
    shape = (rows, cols) if batch is None else (batch, rows, cols)
    x = sparse_input(shape, micro_tile, sparsity, seed=seed)
    index = pit.detect_micro_tiles(x, micro_tile, blocked=blocked)
    assert_matches_reference(index, x, micro_tile, blocked)


@pytest.mark.parametrize("blocked", ["rows", "cols"])
@pytest.mark.parametrize("shape", [(33, 70), (1, 1), (2, 17, 5)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_whole_rows(shape, sparsity, blocked):
    x = sparse_input(shape, (1, None), sparsity, seed=sum(shape))
    index = pit.detect_micro_tiles(x, (1, None), blocked=blocked)
    assert_matches_reference(index, x, (1, None), blocked)


@pytest.mark.parametrize("micro_tile", TILES)
@pytest.mark.parametrize("blocked", ["rows", "cols"])
def test_extreme_sparsities(micro_tile, blocked):
    shape = (2, 45, 38)
    dense = sparse_input(shape, micro_tile, 0.0, seed=1)
    index = pit.detect_micro_tiles(dense, micro_tile, blocked=blocked)
    assert bool(index.to_mask().all())
    assert_matches_reference(index, dense, micro_tile, blocked)

    index = pit.detect_micro_tiles(torch.zeros(shape), micro_tile, blocked=blocked)
    assert bool((index.counts == 0).all())
    assert not bool(index.to_mask().any())


@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("micro_tile", [(1, 1), (4, 8)])
@pytest.mark.parametrize("blocked", ["rows", "cols"])
def test_dtypes(dtype, micro_tile, blocked):
    x = sparse_input((3, 29, 41), micro_tile, 0.5, seed=7, dtype=dtype)
    assert x.dtype == dtype
    index = pit.detect_micro_tiles(x, micro_tile, blocked=blocked)
    assert_matches_reference(index, x, micro_tile, blocked)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8])
@pytest.mark.parametrize("blocked", ["rows", "cols"])
def test_other_readable_dtypes(dtype, blocked):
    x = sparse_input((2, 19, 23), (4, 8), 0.5, seed=8)
    x = (x * 100).to(dtype) if dtype.is_floating_point else (x.sign() * 7).to(dtype)
    index = pit.detect_micro_tiles(x, (4, 8), blocked=blocked)
    assert_matches_reference(index, x, (4, 8), blocked)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nan_and_inf_are_non_empty_and_negative_zero_is_empty(dtype):
    x = torch.zeros(8, 12, dtype=dtype)
    x[1, 5] = float("nan")
    x[6, 0] = float("-inf")
    x[3, 9] = -0.0
    index = pit.detect_micro_tiles(x, (4, 4), blocked="rows")
    expected = torch.tensor([[[False, True, False], [True, False, False]]])
    assert torch.equal(index.to_mask(), expected)
    assert index.counts.tolist() == [[1, 1]]
    assert index.indices[0, 0, 0] == 1 and index.indices[0, 1, 0] == 0


def test_non_contiguous_input():
    base = sparse_input((40, 30), (4, 8), 0.5, seed=3)
    x = base.t()
    assert not x.is_contiguous()
    index = pit.detect_micro_tiles(x, (4, 8), blocked="cols")
    assert_matches_reference(index, x, (4, 8), "cols")


def test_micro_tile_as_list():
    x = sparse_input((20, 20), (4, 8), 0.5, seed=4)
    assert_matches_reference(pit.detect_micro_tiles(x, [4, 8]), x, (4, 8), "rows")


def test_default_is_32_by_1_blocked_by_rows():
    x = sparse_input((70, 50), (32, 1), 0.5, seed=5)
    assert_matches_reference(pit.detect_micro_tiles(x), x, (32, 1), "rows")


def test_eager_detection_runs_without_the_operator_and_traced_detection_through_it(monkeypatch):
    """Eager calls skip the custom operator's dispatch (host time on every call); under
    torch.compile the operator is what the graph records, and both list the same pieces."""
    from pit_compiler import api

    x = sparse_input((40, 24), (4, 8), 0.5, seed=6)
    dispatched = []
    original = api.detect_op
    monkeypatch.setattr(api, "detect_op", lambda *a: dispatched.append(1) or original(*a))
    assert_matches_reference(pit.detect_micro_tiles(x, (4, 8)), x, (4, 8), "rows")
    assert dispatched == []
    def listed(t):
        index = pit.detect_micro_tiles(t, (4, 8))
        return index.counts, index.indices

    counts, indices = torch.compile(listed, backend="eager", fullgraph=True)(x)
    assert dispatched, "the traced call did not go through the operator"
    assert_matches_reference(pit.runtime.MicroTileIndex(counts, indices), x, (4, 8), "rows")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3), (0, 4, 4)])
def test_empty_input(shape):
    x = torch.zeros(shape)
    index = pit.detect_micro_tiles(x, (4, 8), blocked="rows")
    assert_matches_reference(index, x, (4, 8), "rows")


# Bad arguments


@pytest.mark.parametrize("shape", [(5,), (), (2, 3, 4, 5)])
def test_rejects_wrong_dim(shape):
    with pytest.raises(ValueError, match=r"^x must be 2-D"):
        pit.detect_micro_tiles(torch.ones(shape))


@pytest.mark.parametrize("blocked", ["row", "Rows", "k", None])
def test_rejects_bad_blocked(blocked):
    with pytest.raises(ValueError, match=r"^blocked must be"):
        pit.detect_micro_tiles(torch.ones(4, 4), (1, 1), blocked=blocked)


@pytest.mark.parametrize(
    "micro_tile", [(0, 1), (1, 0), (-1, 4), (1.5, 2), (True, 1), "32x1", (32,), (1, 2, 3), 32, None]
)
def test_rejects_bad_micro_tile(micro_tile):
    with pytest.raises(ValueError, match=r"^micro_tile must be"):
        pit.detect_micro_tiles(torch.ones(4, 4), micro_tile)


@pytest.mark.parametrize("x", [[[1.0, 0.0]], None, torch.ones(4, 4).to_sparse()], ids=["list", "none", "sparse"])
def test_rejects_non_dense_tensor(x):
    with pytest.raises(TypeError, match=r"^x must be a"):
        pit.detect_micro_tiles(x, (1, 1))


def test_rejects_unreadable_dtype():
    with pytest.raises(TypeError, match="complex64"):
        pit.detect_micro_tiles(torch.ones(4, 4, dtype=torch.complex64), (1, 1))
