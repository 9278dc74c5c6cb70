"""pit.sparse_matmul against dense torch: every form, operand, dtype, tail and sparsity."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pit_compiler as pit
from pit_compiler.runtime import RecentCounts
from sparse_data import (
    assert_matches_reference,
    block_mask,
    dense_operand,
    expand_mask,
    micro_tile_sparse,
    poisoned,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DENSITIES = [1.0, 0.5, 0.1, 0.01, 0.0]  # sparsity 0 %, 50 %, 90 %, 99 %, 100 %

# (micro_tile, form): form None is PIT's own choice; forced forms cover the others.
A_CASES = [
    ((32, 1), None),  # column pieces: reduce form, condensed k
    ((1, 16), None),  # row pieces: scatter-add form
    ((1, None), None),  # whole rows: plain scatter
    ((8, 8), None),  # blocks: reduce form
    ((32, 1), "scatter"),
    ((1, 16), "reduce"),
]
B_CASES = [((16, 1), None), ((1, 32), None), ((None, 1), None), ((8, 8), "scatter")]


def run_case(sparse, tile, form, dtype, device, density, M=67, K=45, N=33, batch=(), seed=0):
    shapes = {"A": (*batch, M, K), "B": (*batch, K, N)}
    S, _ = micro_tile_sparse(shapes[sparse], tile, density, dtype, device, seed=seed)
    other = dense_operand(shapes["B" if sparse == "A" else "A"], dtype, device, seed=seed + 1)
    A, B = (S, other) if sparse == "A" else (other, S)
    out = poisoned((*batch, M, N), dtype, device)
    result = pit.sparse_matmul(A, B, sparse=sparse, micro_tile=tile, form=form, out=out)
    assert result is out
    assert_matches_reference(result, A.double() @ B.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile,form", A_CASES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_A(tile, form, dtype, device, density):
    run_case("A", tile, form, dtype, device, density)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile,form", B_CASES, ids=str)
@pytest.mark.parametrize("density", [1.0, 0.1, 0.0])
def test_sparse_B_pruned_weights(tile, form, dtype, device, density):
    run_case("B", tile, form, dtype, device, density)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse,tile", [("A", (32, 1)), ("A", (1, 16)), ("A", (1, None)), ("B", (1, 32))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched(sparse, tile, dtype, device):
    run_case(sparse, tile, None, dtype, device, 0.3, M=40, K=70, N=20, batch=(3,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("density", [1.0, 0.4, 0.0])
def test_sparse_output_sdd(dtype, batch, density, device):
    """Only the tiles the mask lists are computed; every other output element is zero."""
    M, K, N, tile = 70, 40, 50, (16, 32)
    A = dense_operand((*batch, M, K), dtype, device, seed=3)
    B = dense_operand((*batch, K, N), dtype, device, seed=4)
    _, mask = micro_tile_sparse((*batch, M, N), tile, density, torch.float32, device, seed=5)
    out = poisoned((*batch, M, N), dtype, device)
    pit.sparse_matmul(A, B, sparse="C", micro_tile=tile, mask=mask, out=out)
    keep = expand_mask(mask, tile, (M, N))
    assert_matches_reference(out, (A.double() @ B.double()) * keep)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["grid", "elements"])
def test_mask_overrides_detection(mask_kind, device):
    """With mask=, micro-tiles outside it are never read: the result is (A * mask) @ B."""
    M, K, N, tile = 50, 64, 30, (16, 1)
    A = dense_operand((M, K), torch.float32, device, seed=6)  # fully dense values
    B = dense_operand((K, N), torch.float32, device, seed=7)
    _, grid = micro_tile_sparse((M, K), tile, 0.3, torch.float32, device, seed=8)
    keep = expand_mask(grid, tile, (M, K))
    mask = grid if mask_kind == "grid" else keep
    out = pit.sparse_matmul(A, B, micro_tile=tile, mask=mask)
    assert_matches_reference(out, (A.double() * keep) @ B.double())


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    A_full, _ = micro_tile_sparse((45, 67), (1, 16), 0.5, torch.float32, device)
    A = A_full.t()  # a transposed view
    B = dense_operand((45, 66), torch.float32, device)[:, ::2]  # a strided slice
    assert not A.is_contiguous() and not B.is_contiguous()
    assert_matches_reference(pit.sparse_matmul(A, B, micro_tile=(32, 1)), A.double() @ B.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 33, 1), (33, 1, 17), (0, 5, 3), (4, 0, 3)])
def test_degenerate_shapes(M, K, N, device):
    A, _ = micro_tile_sparse((M, K), (1, 1), 0.5, torch.float32, device) if M and K else (
        torch.zeros(M, K, device=device), None
    )
    B = dense_operand((K, N), torch.float32, device)
    result = pit.sparse_matmul(A, B, micro_tile=(32, 1))
    assert result.shape == (M, N)
    if result.numel():
        assert_matches_reference(result, A.double() @ B.double())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    M=st.integers(1, 90),
    K=st.integers(1, 90),
    N=st.integers(1, 40),
    case=st.sampled_from(A_CASES),
    density=st.sampled_from(DENSITIES + [0.3, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_property(M, K, N, case, density, seed):
    """Any shape, tails included, at any sparsity: PIT equals dense."""
    tile, form = case
    run_case("A", tile, form, torch.float32, "cpu", density, M=M, K=K, N=N, seed=seed)


def test_second_call_does_not_rebuild():
    cache = pit.kernel_cache()
    A, _ = micro_tile_sparse((40, 40), (32, 1), 0.5, torch.float32)
    B = dense_operand((40, 20), torch.float32)
    pit.sparse_matmul(A, B)
    builds = cache.builds
    A2, _ = micro_tile_sparse((77, 50), (32, 1), 0.2, torch.float32, seed=9)  # other shape too
    pit.sparse_matmul(A2, dense_operand((50, 9), torch.float32))
    assert cache.builds == builds


def test_fresh_inputs_every_call():
    """The index is rebuilt from each call's data: a stale index would give a wrong answer."""
    B = dense_operand((64, 16), torch.float32)
    for seed in range(3):
        A, _ = micro_tile_sparse((48, 64), (32, 1), 0.3, torch.float32, seed=seed)
        assert_matches_reference(pit.sparse_matmul(A, B), A.double() @ B.double())


def test_plan_choices_follow_the_micro_tile():
    from pit_compiler.ir import SparsityAttr, as_contraction, plan_pit

    matmul = as_contraction("C[m, n] += A[m, k] * B[k, n]")
    sizes = {"m": 128, "n": 64, "k": 256}

    def plan(operand, tile):
        return plan_pit(matmul, SparsityAttr(operand, tile), sizes)

    assert (plan("A", (32, 1)).form, plan("A", (32, 1)).permuted) == ("reduce", "k")
    assert (plan("A", (1, 32)).form, plan("A", (1, 32)).accumulate) == ("scatter", True)
    assert (plan("A", (1, 256)).form, plan("A", (1, 256)).accumulate) == ("scatter", False)
    assert (plan("B", (32, 1)).form, plan("B", (32, 1)).permuted) == ("scatter", "n")
    assert (plan("C", (32, 32)).form, plan("C", (32, 32)).permuted) == ("output", "n")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse,tile,form", [("A", (32, 1), None), ("A", (1, 16), None), ("B", (1, 32), None), ("B", (16, 1), None)], ids=str)
@pytest.mark.parametrize("transposed", ["A", "B", "AB"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_transposed_storage_is_read_in_place(sparse, tile, form, transposed, with_mask, device):
    """W.t() of a Linear weight, or a backward operand: a kernel for that layout, no copy."""
    M, K, N = 37, 70, 29
    shapes = {"A": (M, K), "B": (K, N)}
    S, grid = micro_tile_sparse(shapes[sparse], tile, 0.4, torch.float32, device, seed=21)
    other = dense_operand(shapes["B" if sparse == "A" else "A"], torch.float32, device, seed=22)
    A, B = (S, other) if sparse == "A" else (other, S)
    if "A" in transposed:
        A = A.t().contiguous().t()
    if "B" in transposed:
        B = B.t().contiguous().t()
    mask = grid if with_mask else None
    out = poisoned((M, N), torch.float32, device)
    pit.sparse_matmul(A, B, sparse=sparse, micro_tile=tile, form=form, mask=mask, out=out)
    assert_matches_reference(out, A.double() @ B.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_linear_weight_read_from_a_compact_copy_where_only_that_reaches_tensor_cores(density, device, monkeypatch):
    """``x @ W.t()`` with sparse x: where a tensor-core tile reads B stored (k, n) and none
    reads the transposed view (Hopper's warpgroup tile; patched in on the CPU), B comes from
    one kept compact copy of W, made anew once W is written."""
    from pit_compiler import ops
    from pit_compiler.runtime import CompactCopies

    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cpu":
        def compact_only(plan, *facts):
            return "reduce" if plan.contraction.order("b") == ("k", "n") else None

        monkeypatch.setattr(ops, "tensor_core_kernel", compact_only)
    copies = CompactCopies(1 << 30)
    monkeypatch.setattr(ops, "COMPACT_COPIES", copies)
    made = []
    original = copies.get
    monkeypatch.setattr(copies, "get", lambda view: made.append(original(view)) or made[-1])
    x, _ = micro_tile_sparse((300, 520), (32, 1), density, dtype, device, seed=5)
    W = dense_operand((776, 520), dtype, device, seed=6)  # nn.Linear layout (out, in)
    for step in range(3):
        out = poisoned((300, 776), dtype, device)
        pit.sparse_matmul(x, W.t(), micro_tile=(32, 1), out=out)
        assert_matches_reference(out, x.double() @ W.double().t())
        if step == 1:
            with torch.no_grad():
                W.mul_(-0.5)  # an optimizer step: the next call copies again
    assert len(made) == 3 and made[0] is made[1] and made[2] is not made[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_pruned_weight_runs_as_the_sparse_a_of_the_transposed_product(density, with_mask, grad, device, monkeypatch):
    """``x @ W.t()`` with W pruned (sparse B): no tensor-core kernel takes a sparse B, but W
    stored (n, k) is a sparse A as the warpgroup tile reads one, so ``C^T = W @ x^T`` runs
    (patched in on the CPU), with the index and the backward's grid still W's."""
    from pit_compiler import ops

    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cpu":
        def sparse_a_only(plan, *facts):
            return "reduce" if plan.sparse == "a" and plan.contraction.order("b") == ("k", "n") else None

        monkeypatch.setattr(ops, "tensor_core_kernel", sparse_a_only)
    ran = []
    original = ops.pit_matmul
    monkeypatch.setattr(ops, "pit_matmul", lambda A, B, out, sparse, *a, **k: ran.append(sparse) or original(A, B, out, sparse, *a, **k))
    W, grid = micro_tile_sparse((776, 520), (64, 32), density, dtype, device, seed=8)  # (out, in), 64x32 blocks
    x = dense_operand((304, 520), dtype, device, seed=9).requires_grad_(grad)  # tokens: the N of C^T, a multiple of 8
    mask = grid.t() if with_mask else None
    result = pit.sparse_matmul(x, W.t(), sparse="B", micro_tile=(32, 64), mask=mask)
    assert ran == ["A"], "the transposed product should have run"
    assert_matches_reference(result, x.detach().double() @ W.double().t())
    if grad:
        dy = dense_operand((304, 776), dtype, device, seed=10)
        (dx,) = torch.autograd.grad(result, x, dy)
        assert_matches_reference(dx, dy.double() @ W.double())


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(1, None), (4, None)], ids=str)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("M", [1, 300, 1000])
def test_whole_rows_run_on_tensor_cores(tile, density, M, monkeypatch):
    """K and N multiples of the tile: the mma.sync row gather, checked like the rest (Hopper
    runs the warpgroup tile first: switched off here, tested in codegen/test_warpgroup.py)."""
    from pit_compiler import ops

    dtype = torch.float16
    monkeypatch.setattr(ops, "warpgroup_knobs", lambda *a: None)
    taken = []
    original = ops.run_row_gather_on_tensor_cores
    monkeypatch.setattr(ops, "run_row_gather_on_tensor_cores", lambda *a: taken.append(original(*a)) or taken[-1])
    K, N = 256, 384
    A, _ = micro_tile_sparse((M, K), tile, density, dtype, "cuda", seed=M)
    B = dense_operand((K, N), dtype, "cuda", seed=M + 1)
    out = poisoned((M, N), dtype, "cuda")
    pit.sparse_matmul(A, B, micro_tile=tile, out=out)
    assert taken == [True], "the tensor-core path did not run"
    assert_matches_reference(out, A.double() @ B.double())


# ---------------------------------------------------------------------------------------------
# The dense fallback: a detected operand too dense for PIT runs as torch.matmul (GPU only).


def _index(counts, chunks):
    from pit_compiler.runtime import MicroTileIndex

    counts = torch.tensor([counts], dtype=torch.int32)
    return MicroTileIndex(counts, torch.zeros(1, counts.shape[1], chunks, dtype=torch.int32))


@pytest.mark.parametrize("counts,wins", [([0, 0], False), ([1, 0], False), ([2, 1], True), ([4, 4], True)])
def test_dense_wins_above_the_crossover(counts, wins, monkeypatch):
    from pit_compiler import ops

    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())
    call = ("a call signature",)
    assert ops.dense_wins(_index(counts, chunks=4), 0.15, call) is wins  # 8 slots: the crossover lies at 1.2 listed
    monkeypatch.setattr(ops, "DENSE_FALLBACK", True)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert ops.falls_back_on(torch.device("cuda")) and not ops.falls_back_on(torch.device("cpu"))
    capturing[0] = True  # a CUDA graph capture: no host read
    assert not ops.falls_back_on(torch.device("cuda"))


def test_the_fallback_decides_by_the_newest_arrived_count_of_its_signature(monkeypatch):
    """No wait for the GPU: a call weighs the count of the previous call of its signature
    (on the CPU every copy has arrived at once); only a signature's first call reads its own."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())
    dense, sparse = _index([4, 4], chunks=4), _index([0, 1], chunks=4)
    assert ops.dense_wins(dense, 0.15, "x")  # first call of "x": its own count
    assert ops.dense_wins(sparse, 0.15, "x")  # decided by the dense call before it
    assert not ops.dense_wins(sparse, 0.15, "x")
    assert not ops.dense_wins(sparse, 0.15, "y") and not ops.dense_wins(dense, 0.15, "y")
    assert ops.dense_wins(dense, 0.15, "y")


@pytest.mark.parametrize(
    "tile,dtype,crossover",
    [((1, None), torch.float16, 0.70), ((1, None), torch.bfloat16, 0.70), ((128, 64), torch.float16, 0.60),
     ((64, 64), torch.float16, 0.44), ((32, 32), torch.float16, 0.19), ((32, 32), torch.bfloat16, 0.19),
     ((32, 1), torch.float16, 0.15), ((64, 4), torch.bfloat16, 0.16), ((16, 32), torch.float16, 0.10), ((16, 1), torch.bfloat16, 0.001),
     ((32, 1), torch.float32, 0.01)],
    ids=str,
)
@pytest.mark.parametrize("size", [8192, 4096, 256])
def test_each_kernel_has_its_measured_crossover(tile, dtype, crossover, size, monkeypatch):
    """The crossover follows the kernel that would run: the warpgroup (H100, session 13) and
    mma.sync (H200) tiles by their measured throughput, the one-thread-per-output kernel (here bfloat16 16-row column
    pieces) almost never. The warpgroup tile's, measured at 8192^3, shrink for smaller products
    by the share of cuBLAS's time above a PIT call's floor (0.10 ms): to 0.93 of them at 8192^3,
    0.45 at 4096^3, none at 256^3."""
    from pit_compiler import ops
    from pit_compiler.ir import SparsityAttr, plan_pit
    from tvm.target import Target

    sm90 = Target({"kind": "cuda", "arch": "sm_90"})
    monkeypatch.setattr(ops, "target_for", lambda device: sm90)
    M, K, N = size, size, size
    A, B, out = (torch.empty((), dtype=dtype).expand(shape) for shape in ((M, K), (K, N), (M, N)))
    concrete = (tile[0], tile[1] or K)
    plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", concrete), {"m": M, "n": N, "k": K})
    on_warpgroups = dtype != torch.float32 and tile[0] in (1, 32, 64, 128)
    room = {8192: 0.93, 4096: 0.45, 256: 0.0}[size] if on_warpgroups else 1.0
    assert ops.dense_crossover(plan, A, B, out) == pytest.approx(crossover * room, abs=0.006)


@pytest.mark.parametrize("tile, size, crossover", [((1, 32), 8192, 0.0365), ((1, 64), 8192, 0.073), ((2, 32), 8192, 0.0365),
                                                  ((1, 16), 8192, 0.0182), ((1, 64), 4096, 0.0117), ((1, 32), 2048, 0.0)], ids=str)
def test_strips_cross_cublas_where_their_adds_reach_its_time(tile, size, crossover, monkeypatch):
    """Row pieces of k chunks on Hopper (strips): each listed piece adds N float32 values to each
    of its rows, so their crossover falls with the chunk's width and, past a fixed cost per output
    element, rises with the product's size; none for small products."""
    from pit_compiler import ops
    from pit_compiler.ir import SparsityAttr, plan_pit
    from tvm.target import Target

    monkeypatch.setattr(ops, "target_for", lambda device: Target({"kind": "cuda", "arch": "sm_90"}))
    A, B, out = (torch.empty((), dtype=torch.float16).expand(size, size) for _ in range(3))
    plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", tile), {"m": size, "n": size, "k": size})
    assert plan.accumulate and ops.tensor_core_path(plan, A, B, out) == "strips"
    assert ops.dense_crossover(plan, A, B, out) == pytest.approx(crossover, abs=0.0005)


@pytest.mark.parametrize("fallback", [True, False])
@pytest.mark.parametrize("sparse,tile", [("A", (32, 1)), ("A", (1, None)), ("B", (1, 32))], ids=str)
def test_dense_fallback_runs_torch_matmul_exactly(sparse, tile, fallback, monkeypatch):
    """Where dense wins the call is torch.matmul of the operands as given (exact: detection
    found the rest zero); dense_fallback=False keeps the PIT kernels."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "falls_back_on", lambda device: True)  # as on a GPU
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())  # the first call of its signature: dense_wins decides
    monkeypatch.setattr(ops, "dense_wins", lambda index, crossover, call: True)
    ran_pit = []
    original = ops.run_matmul
    monkeypatch.setattr(ops, "run_matmul", lambda *a: ran_pit.append(True) or original(*a))
    shapes = {"A": (70, 48), "B": (48, 40)}
    S, _ = micro_tile_sparse(shapes[sparse], tile, 0.5, torch.float32, "cpu", seed=5)
    other = dense_operand(shapes["B" if sparse == "A" else "A"], torch.float32, "cpu", seed=6)
    A, B = (S, other) if sparse == "A" else (other, S)
    out = poisoned((70, 40), torch.float32, "cpu")
    pit.sparse_matmul(A, B, sparse=sparse, micro_tile=tile, out=out, dense_fallback=fallback)
    assert_matches_reference(out, A.double() @ B.double())
    assert ran_pit == ([] if fallback else [True])


@pytest.mark.parametrize(
    "sparse,tile,mask_kind",
    [("A", (32, 1), None), ("A", (32, 1), "grid"), ("A", (1, None), "grid"), ("A", (8, 8), "operand"),
     ("B", (1, 32), "grid"), ("B", (16, 1), "operand"), ("B", (None, 1), "operand"), ("C", (8, 8), "grid"),
     ("C", (16, 16), "operand")],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_products_below_the_call_floor_run_dense_without_detecting(sparse, tile, mask_kind, dtype, density, monkeypatch):
    """Where dense kernels are weighed (a GPU; patched in here), a product cuBLAS finishes within
    PIT's per-call floor runs torch.matmul without detecting, the micro-tiles a mask leaves out
    as zero (exact); dense_fallback=False keeps PIT's kernels, for the same product."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "weighs_dense_kernels", lambda device: True)
    detected = []
    original = ops.detect_as
    monkeypatch.setattr(ops, "detect_as", lambda *a: detected.append(1) or original(*a))
    M, K, N = 70, 45, 33
    shapes = {"A": (M, K), "B": (K, N), "C": (M, N)}
    rows, cols = (size if t is None else t for t, size in zip(tile, shapes[sparse]))
    generator = torch.Generator().manual_seed(12)
    A, B = dense_operand((M, K), dtype, seed=13), dense_operand((K, N), dtype, seed=14)
    grid = block_mask((-(-shapes[sparse][0] // rows), -(-shapes[sparse][1] // cols)), density, generator)
    mask = grid
    if mask_kind == "operand":  # one element per listed micro-tile marks it
        mask = torch.zeros(shapes[sparse], dtype=torch.bool)
        for i, j in grid.nonzero().tolist():
            mask[min(i * rows + min(3, rows - 1), shapes[sparse][0] - 1), min(j * cols + min(1, cols - 1), shapes[sparse][1] - 1)] = True
    elif mask_kind is None:
        A = A * expand_mask(grid, (rows, cols), (M, K))
    keep = expand_mask(grid, (rows, cols), shapes[sparse]).double()
    a, b = A.double(), B.double()
    expected = {"A": lambda: (a * keep) @ b, "B": lambda: a @ (b * keep), "C": lambda: (a @ b) * keep}[sparse]()
    for fallback in (True, False):
        detected.clear()
        out = poisoned((M, N), dtype)
        pit.sparse_matmul(A, B, sparse=sparse, micro_tile=tile, mask=mask, out=out, dense_fallback=fallback)
        assert_matches_reference(out, expected)
        assert bool(detected) != fallback


def test_the_call_floor_scales_with_the_dense_work():
    from pit_compiler import ops

    def below(M, K, N, dtype=torch.float16, batch=()):
        return ops.below_call_floor(_huge(*batch, M, K, dtype=dtype), _huge(*batch, K, N, dtype=dtype))

    assert below(4096, 768, 3072)  # BERT-base's feed-forward at 4096 tokens: about 26 us dense
    assert not below(8192, 8192, 8192) and not below(4096, 4096, 4096)
    assert not below(2048, 2048, 2048, torch.float32)  # float32 cuBLAS: about ten times slower
    assert below(2048, 2048, 2048) and not below(2048, 2048, 2048, batch=(8,))


def test_traced_calls_without_gradients_build_no_grid():
    """Under torch.compile a call that needs no gradient is ``pit.sparse_matmul_forward`` (no
    micro-tile grid for a backward); one that needs it is ``pit.sparse_matmul``."""
    import torch._dynamo

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    A, _ = micro_tile_sparse((40, 64), (32, 1), 0.5, torch.float32, seed=15)
    B = dense_operand((64, 24), torch.float32, seed=16)
    expected = A.double() @ B.double()
    for grad in (False, True):
        torch._dynamo.reset()
        graphs.clear()
        operand = B.clone().requires_grad_(grad)
        out = torch.compile(lambda A, B: pit.sparse_matmul(A, B, micro_tile=(32, 1)), backend=backend, fullgraph=True)(A, operand)
        assert_matches_reference(out.detach(), expected)
        ops_called = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
        assert ("pit.sparse_matmul.default" in ops_called) == grad
        assert ("pit.sparse_matmul_forward.default" in ops_called) != grad
    torch._dynamo.reset()


def test_dense_fallback_must_be_a_bool():
    A, B = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(TypeError, match="dense_fallback"):
        pit.sparse_matmul(A, B, dense_fallback="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("density,dense", [(1.0, True), (0.5, True), (0.05, False)])
def test_dense_fallback_on_the_gpu(density, dense, monkeypatch):
    from pit_compiler import ops

    monkeypatch.setattr(ops, "DENSE_FALLBACK", True)
    monkeypatch.setattr(ops, "CALL_FLOOR_MS", 0.0)  # the crossover of large products, on this small one
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())  # the first call of its signature: its own count
    ran_pit = []
    original = ops.run_on_tensor_cores
    monkeypatch.setattr(ops, "run_on_tensor_cores", lambda *a, **k: ran_pit.append(original(*a, **k)) or ran_pit[-1])
    A, _ = micro_tile_sparse((512, 256), (32, 1), density, torch.float16, "cuda", seed=7)
    B = dense_operand((256, 384), torch.float16, "cuda", seed=8)
    out = poisoned((512, 384), torch.float16, "cuda")
    pit.sparse_matmul(A, B, micro_tile=(32, 1), out=out)
    assert_matches_reference(out, A.double() @ B.double())
    assert ran_pit == ([] if dense else [True])


def test_a_known_count_decides_before_detection(monkeypatch):
    """After a signature's first call, the fallback is decided by the newest count that reached
    the host before detecting (queued ahead of it: the GPU works while the host goes on);
    detection still runs, for the next call's count, except on the calls a known count sends to
    cuBLAS after the first of them (one in ``DENSE_PROBE_EVERY`` detects). Exact on every path."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "falls_back_on", lambda device: True)  # as on a GPU
    monkeypatch.setattr(ops, "dense_crossover", lambda *a: 0.5)
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())
    steps = []
    detect_as, run_matmul, matmul = ops.detect_as, ops.run_matmul, torch.matmul
    monkeypatch.setattr(ops, "detect_as", lambda *a: steps.append("detect") or detect_as(*a))
    monkeypatch.setattr(ops, "run_matmul", lambda *a: steps.append("pit") or run_matmul(*a))
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: steps.append("dense") or matmul(*a, **k))
    B = dense_operand((48, 40), torch.float32, "cpu", seed=21)
    expected = [
        (1.0, ["detect", "dense"]),  # the first call reads its own count
        (0.1, ["dense", "detect"]),  # decided by the dense count before it
        (0.1, ["detect", "pit"]),
        (1.0, ["detect", "pit"]),
        (0.1, ["dense"]),  # sent to cuBLAS by a known count a second time: no detection
        (0.1, ["dense"]),  # still decided by call 4's count
    ]
    for seed, (density, steps_expected) in enumerate(expected):
        A, _ = micro_tile_sparse((70, 48), (32, 1), density, torch.float32, "cpu", seed=30 + seed)
        out = poisoned((70, 40), torch.float32, "cpu")
        steps.clear()
        pit.sparse_matmul(A, B, micro_tile=(32, 1), out=out)
        assert_matches_reference(out, A.double() @ B.double())
        assert steps == steps_expected, (density, steps)


@pytest.mark.parametrize("keep_index", [False, True])
def test_calls_a_known_count_sends_to_cubLAS_detect_one_time_in_eight(keep_index, monkeypatch):
    """While the newest count sends a signature's calls to cuBLAS, the first of them and then
    one in ``DENSE_PROBE_EVERY`` detect (refreshing that count); the rest return None without
    detecting, exact. A caller that keeps the index (autograd) detects on every call; so does
    another signature, which keeps its own turns; and a pattern turned sparse is followed from
    the next probe on."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "falls_back_on", lambda device: True)  # as on a GPU
    monkeypatch.setattr(ops, "dense_crossover", lambda *a: 0.5)
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())
    detections = []
    detect_as = ops.detect_as
    monkeypatch.setattr(ops, "detect_as", lambda *a: detections.append(True) or detect_as(*a))
    B = dense_operand((48, 40), torch.float32, "cpu", seed=21)
    dense_A, _ = micro_tile_sparse((70, 48), (32, 1), 1.0, torch.float32, "cpu", seed=31)
    sparse_A, _ = micro_tile_sparse((70, 48), (32, 1), 0.1, torch.float32, "cpu", seed=32)

    def call(A, tile=(32, 1)):
        out = poisoned((70, 40), torch.float32, "cpu")
        detections.clear()
        used = ops.pit_matmul(A, B, out, "A", tile, (3, 48 // tile[1]), None, None, dense_fallback=True, keep_index=keep_index)
        assert_matches_reference(out, A.double() @ B.double())
        return bool(detections), used

    every = ops.DENSE_PROBE_EVERY
    first = call(dense_A)  # reads its own count
    assert first[0] and first[1] is not None
    calls = [call(dense_A) for _ in range(2 * every + 1)]
    detected = [d for d, _ in calls]
    if keep_index:
        assert all(detected) and all(used is not None for _, used in calls)
    else:
        assert detected == [turn % every == 0 for turn in range(len(calls))]
        assert all((used is None) != d for d, used in calls)
    assert call(dense_A, tile=(16, 1))[0]  # another signature: its own first call
    # The pattern turns sparse one call past a probe: followed from the next probe on.
    steps = [call(sparse_A)[0] for _ in range(every + 1)]
    assert steps == ([True] * (every + 1) if keep_index else [False] * (every - 1) + [True, True])
    assert call(sparse_A)[1] is not None  # PIT's kernel, on the sparse count


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(1, None), (32, 1)], ids=str)
def test_calls_decided_ahead_of_detection_on_the_gpu(tile, monkeypatch):
    """On a GPU with the fallback on, a pattern that changes from call to call: once a count of
    the signature has landed, whole rows zero C ahead of detection (the 32x1 tile writes every
    row itself) and the fallback is queued ahead too. Every output is exact."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "DENSE_FALLBACK", True)
    monkeypatch.setattr(ops, "CALL_FLOOR_MS", 0.0)  # the crossover of large products, on this small one
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())
    zeroed = []
    original = ops.run_on_tensor_cores
    monkeypatch.setattr(ops, "run_on_tensor_cores", lambda *a, **k: zeroed.append(k["zeroed"]) or original(*a, **k))
    B = dense_operand((256, 384), torch.float16, "cuda", seed=8)
    for seed, density in enumerate([0.05, 0.05, 1.0, 0.05, 0.3, 0.0, 0.05]):
        A, _ = micro_tile_sparse((520, 256), tile, density, torch.float16, "cuda", seed=40 + seed)
        out = poisoned((520, 384), torch.float16, "cuda")
        pit.sparse_matmul(A, B, micro_tile=tile, out=out)
        assert_matches_reference(out, A.double() @ B.double())
        torch.cuda.synchronize()  # this call's count lands before the next call
    assert (True in zeroed) is (tile == (1, None)), zeroed


def test_dense_fallback_keeps_the_gradient_sparse(monkeypatch):
    """Through the autograd operator too: the forward runs dense, the gradient of the sparse
    operand keeps the detected micro-tiles."""
    from pit_compiler import ops

    monkeypatch.setattr(ops, "falls_back_on", lambda device: True)  # as on a GPU
    monkeypatch.setattr(ops, "RECENT_COUNTS", RecentCounts())  # the first call of its signature: dense_wins decides
    monkeypatch.setattr(ops, "dense_wins", lambda index, crossover, call: True)
    ran_pit = []
    original = ops.run_matmul
    monkeypatch.setattr(ops, "run_matmul", lambda *a: ran_pit.append(a[0].form) or original(*a))
    S, _ = micro_tile_sparse((70, 48), (32, 1), 0.5, torch.float32, "cpu", seed=9)
    A = S.clone().requires_grad_(True)
    B = dense_operand((48, 40), torch.float32, "cpu", seed=10).requires_grad_(True)
    C = pit.sparse_matmul(A, B, micro_tile=(32, 1))
    assert_matches_reference(C.detach(), S.double() @ B.detach().double())
    assert ran_pit == [], "the forward ran PIT's kernel"
    dC = dense_operand((70, 40), torch.float32, "cpu", seed=11)
    C.backward(dC)
    kept = (S != 0).view(70, 48)
    pieces = kept.new_zeros(96, 48)
    pieces[:70] = kept
    pieces = pieces.view(3, 32, 48).any(1).repeat_interleave(32, 0)[:70]
    assert_matches_reference(A.grad, (dC.double() @ B.detach().double().T) * pieces)
    assert_matches_reference(B.grad, S.double().T @ dC.double())


def test_no_host_reads_while_a_cuda_graph_is_captured(monkeypatch):
    """Under capture neither the fallback's count nor the row gather's launch size is read back:
    the whole-row tile declines (the plain kernel runs) before reading anything."""
    from pit_compiler import ops
    from pit_compiler.ir import SparsityAttr, plan_pit
    from tvm.target import Target

    monkeypatch.setattr(ops, "DENSE_FALLBACK", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert ops.capturing_graph(torch.device("cuda")) and not ops.falls_back_on(torch.device("cuda"))
    assert not ops.capturing_graph(torch.device("cpu"))
    sm90 = Target({"kind": "cuda", "arch": "sm_90"})
    monkeypatch.setattr(ops, "target_for", lambda device: sm90)
    monkeypatch.setattr(ops, "capturing_graph", lambda device: True)  # these tensors live on the CPU
    M, K, N = 256, 256, 384
    A, B, out = (torch.empty(shape, dtype=torch.float16) for shape in ((M, K), (K, N), (M, N)))
    rows = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", (1, K)), {"m": M, "n": N, "k": K})
    assert ops.tensor_core_path(rows, A, B, out) == "row_gather"
    index = ops.MicroTileIndex(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, M, dtype=torch.int32))
    assert ops.run_row_gather_on_tensor_cores(rows, A, B, out, index) is False


# ---------------------------------------------------------------------------------------------
# Bad operands: one clear error naming the argument, before any kernel is built.


def _huge(*shape, dtype=torch.float16):
    """A tensor of ``shape`` that takes no memory (one element, expanded)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(shape)


@pytest.mark.parametrize(
    "A, B, error, message",
    [(lambda: _huge(2**16, 2**15), lambda: torch.zeros(2**15, 8, dtype=torch.float16), ValueError, "^A has 2147483648 elements"),
     (lambda: torch.zeros(8, 2**16, dtype=torch.float16), lambda: _huge(2**16, 2**15), ValueError, "^B has 2147483648"),
     (lambda: _huge(2**16, 8), lambda: _huge(8, 2**15), ValueError, "^the product A @ B has 2147483648"),
     (lambda: torch.zeros(4, 5), lambda: torch.zeros(6, 3), ValueError, r"A.shape\[-1\] \(5\) must equal B.shape\[-2\] \(6\)"),
     (lambda: torch.zeros(4, 5), lambda: torch.zeros(5, 3, dtype=torch.float16), TypeError, "must share a dtype"),
     (lambda: torch.zeros(4, 5, dtype=torch.int32), lambda: torch.zeros(5, 3), TypeError, "^A has dtype torch.int32")],
    ids=["A too large", "B too large", "product too large", "inner dims", "dtypes", "int A"],
)
def test_bad_operands_get_one_clear_error(A, B, error, message):
    with pytest.raises(error, match=message):
        pit.sparse_matmul(A(), B(), micro_tile=(32, 1))


def test_a_call_signature_is_routed_once_and_each_layout_apart(monkeypatch):
    """Calls keep their route per shape, stride, dtype and device: the second call of a signature
    derives nothing, and a transposed view of the same shape gets its own (right) route."""
    from pit_compiler import ops

    derived = []
    original = ops._derive_route
    monkeypatch.setattr(ops, "_derive_route", lambda *a: derived.append(a[3]) or original(*a))
    A, _ = micro_tile_sparse((70, 45), (32, 1), 0.4, torch.float32, "cpu", seed=3)
    B = dense_operand((45, 33), torch.float32, seed=4)
    reference = A.double() @ B.double()
    for _ in range(3):
        assert_matches_reference(pit.sparse_matmul(A, B, micro_tile=(32, 1)), reference)
    assert len(derived) == 1
    A_t = A.t().contiguous().t()  # the same values, stored transposed
    assert_matches_reference(pit.sparse_matmul(A_t, B, micro_tile=(32, 1)), reference)
    assert_matches_reference(pit.sparse_matmul(A, B.t().contiguous().t(), micro_tile=(32, 1)), reference)
    assert len(derived) == 3
