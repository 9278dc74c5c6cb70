"""Run-time selection on synthetic database entries: fitted lines, re-covering, dense, defaults."""

import logging

import pytest
import torch
from tvm.target import Target

import pit_compiler as pit
import pit_compiler.api as api
from pit_compiler.ir import SparsityAttr, plan_pit
from pit_compiler.ops import matmul_contraction
from pit_compiler.schedules import template_for
from pit_compiler.tuning import DEFAULT_MICRO_TILE, TileDatabase, fit_line, select_micro_tile, set_tile_database
from pit_compiler.tuning import cost_model
from pit_compiler.tuning.cost_model import best_knobs, count_candidate
from pit_compiler.tuning.database import dense_workload, matmul_workload

from sparse_data import assert_matches_reference, micro_tile_sparse, poisoned

LLVM = Target("llvm")
SHAPE = (256, 256, 256)  # M, N, K
# Per micro-tile: (ms per call, ms per listed micro-tile). A 32x32 tile does 32 times the work
# of a 32x1 tile but costs only 20 times as much: dense tiles are more efficient per element.
# A 4x1 tile is too short for the reduce form: it runs as a scatter with partial sums added,
# so it costs more per tile than a 16x1 one in the reduce form.
LINES = {(32, 1): (0.01, 0.001), (32, 32): (0.01, 0.02), (4, 1): (0.01, 0.002), (16, 1): (0.01, 0.0012)}


def record_kernel(db, tile, a, b, *, knobs=None, shape=SHAPE, dtype="float32", detect_ms=0.001):
    M, N, K = shape
    plan = plan_pit(matmul_contraction(2), SparsityAttr("A", tile), {"m": M, "n": N, "k": K})
    workload = matmul_workload(plan, shape, dtype, LLVM, template_for(LLVM))
    tiles = -(-M // tile[0]) * -(-K // tile[1])
    for sparsity in (0.5, 0.9, 0.99):
        listed = round((1 - sparsity) * tiles)
        for setting, extra in ((knobs or {"parallel": True}, 0.0), ({"parallel": False}, 1.0)):
            point = {"knobs": setting, "sparsity": sparsity, "shape": list(shape), "listed": listed, "tiles": tiles}
            db.record(workload, f"{setting}/{sparsity}", {**point, "ms": a + b * listed + extra})
    db.record(workload, "x".join(map(str, shape)), {"shape": list(shape), "ms": detect_ms}, part="detect")


def record_dense(db, ms, shape=SHAPE):
    db.record(dense_workload(shape, "float32", LLVM), "x".join(map(str, shape)), {"shape": list(shape), "ms": ms})


@pytest.fixture
def db():
    database = TileDatabase(None)
    for tile in ((32, 1), (32, 32)):
        record_kernel(database, tile, *LINES[tile])
    record_dense(database, 100.0)
    return database


def operand(tile, sparsity, seed=0):
    return micro_tile_sparse((SHAPE[0], SHAPE[2]), tile, 1 - sparsity, torch.float32, seed=seed)[0]


def test_fit_line_recovers_a_line_and_never_predicts_below_zero():
    line = fit_line([10, 20, 40], [1.5, 2.5, 4.5])
    assert line.a == pytest.approx(0.5) and line.b == pytest.approx(0.1) and line.points == 3
    through_origin = fit_line([10, 20], [0.5, 2.0])  # a free fit would cross below zero
    assert through_origin.a == 0 and through_origin(0) == 0 and through_origin.b > 0
    assert fit_line([5], [1.0]).b == pytest.approx(0.2)
    assert fit_line([0, 0], [1.0, 3.0])(0) == pytest.approx(2.0)


def test_best_knobs_compare_the_points_every_setting_measured(db):
    (entry,) = [e for _, e in db.find(op="pit_matmul", micro_tile=[32, 1])]
    assert best_knobs(entry) == {"parallel": True}


def test_scattered_pattern_keeps_the_fine_micro_tile(db):
    A, B = operand((32, 1), 0.95), torch.randn(SHAPE[2], SHAPE[1])
    choice = select_micro_tile(A, B, database=db)
    assert choice.micro_tile == (32, 1) and choice.source == "database"
    # Scattered 32x1 pieces leave few 32x32 tiles empty: coarse tiles list far more work.
    assert choice.listed["32x32"] * 32 > 5 * choice.listed["32x1"]
    assert choice.predicted_ms["32x1"] < choice.predicted_ms["32x32"] < choice.predicted_ms["dense"]
    assert choice.predicted_ms["32x1"] == pytest.approx(0.001 + 0.01 + 0.001 * choice.listed["32x1"])


def test_blocky_pattern_picks_the_coarse_micro_tile(db):
    A, B = operand((32, 32), 0.9), torch.randn(SHAPE[2], SHAPE[1])
    choice = select_micro_tile(A, B, database=db)
    assert choice.micro_tile == (32, 32)
    assert choice.listed["32x1"] == 32 * choice.listed["32x32"]
    torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile=choice.micro_tile, mask=choice.grid), A @ B)


def test_a_fine_pattern_is_re_covered_by_a_coarser_micro_tile():
    db = TileDatabase(None)
    for tile in ((4, 1), (16, 1)):
        record_kernel(db, tile, *LINES[tile])
    A, B = operand((4, 1), 0.97, seed=3), torch.randn(SHAPE[2], SHAPE[1])
    choice = select_micro_tile(A, B, database=db)
    # 4x1 lists 3 % of its tiles; 16x1 covers them with ~11 % of its (4x fewer) tiles, cheaper each.
    assert choice.micro_tile == (16, 1)
    assert choice.listed["16x1"] < choice.listed["4x1"]
    assert select_micro_tile(A, B, candidates=[(4, 1)], database=db).micro_tile == (4, 1)


def test_dense_wins_when_it_is_predicted_fastest(db):
    record_dense(db, 0.0001)
    A, B = operand((32, 1), 0.5), torch.randn(SHAPE[2], SHAPE[1])
    assert select_micro_tile(A, B, database=db).dense
    assert not select_micro_tile(A, B, dense=False, database=db).dense


@pytest.mark.parametrize("shape, tile", [((64, 96), (32, 1)), ((2, 70, 45), (32, 32)), ((33, 65), (1, 65)), ((5, 7), (4, 3))])
@pytest.mark.parametrize("transposed", [False, True])
def test_candidate_count_is_the_pooled_non_zero_mask(shape, tile, transposed):
    x, _ = micro_tile_sparse(shape, tile, 0.4, torch.float32)
    x[..., 0, 0] = float("nan")  # NaN counts as non-zero, as in detection
    if transposed:  # a transposed view (nn.Linear's W.t()), read in place
        x, tile = x.transpose(-1, -2).contiguous().transpose(-1, -2), tile
    (R, C), (rows, cols) = x.shape[-2:], tile
    padded = torch.zeros(*x.shape[:-2], -(-R // rows) * rows, -(-C // cols) * cols, dtype=torch.bool)
    padded[..., :R, :C] = x != 0
    expected = padded.unflatten(-1, (-1, cols)).unflatten(-3, (-1, rows)).any(-1).any(-2)
    count = count_candidate(x, tile)
    assert torch.equal(count.grid(), expected) and int(count.listed) == int(expected.sum())


def test_pruning_detects_only_candidates_that_can_still_win(monkeypatch):
    db = TileDatabase(None)
    record_kernel(db, (32, 32), *LINES[(32, 32)], detect_ms=0.001)
    record_kernel(db, (32, 1), *LINES[(32, 1)], detect_ms=0.05)  # bound 0.06 ms: detection alone
    record_dense(db, 100.0)
    A, B = torch.zeros(SHAPE[0], SHAPE[2]), torch.randn(SHAPE[2], SHAPE[1])
    A[32:64, 96:128] = torch.rand(32, 32) + 0.5  # one 32x32 block: 0.011 + 0.02 ms predicted
    full = select_micro_tile(A, B, database=db)
    detected = []
    original = cost_model.count_candidate

    def spy(operand, tile):
        detected.append(tuple(tile))
        return original(operand, tile)

    monkeypatch.setattr(cost_model, "count_candidate", spy)
    pruned = select_micro_tile(A, B, prune=True, database=db)
    assert pruned.micro_tile == full.micro_tile == (32, 32)
    assert pruned.predicted_ms.items() <= full.predicted_ms.items() and "32x1" not in pruned.predicted_ms
    assert detected == [(32, 32)]  # 32x1 can do no better than its 0.06 ms bound
    # Where dense beats every candidate's bound, nothing is detected at all.
    detected.clear()
    record_dense(db, 1e-6)
    assert select_micro_tile(A, B, prune=True, database=db).dense
    assert detected == []


@pytest.fixture
def detections(monkeypatch):
    """The micro-tiles each selection detects; fresh counts of earlier calls."""
    from pit_compiler.runtime import RecentCounts

    monkeypatch.setattr(cost_model, "_recent", RecentCounts())
    monkeypatch.setattr(cost_model, "_probe_turn", {})
    detected = []
    original = cost_model.count_candidate
    monkeypatch.setattr(cost_model, "count_candidate", lambda x, tile: detected.append(tuple(tile)) or original(x, tile))
    return detected


def test_auto_decides_by_earlier_counts_and_detects_the_choice_and_one_rival(process_database, detections):
    """micro_tile="auto" never waits for the GPU: the first call of a shape counts every candidate;
    later ones predict from earlier calls' counts (on the CPU every copy has arrived at once),
    detect the choice they run and, in turn, one rival, and so follow a changing pattern one
    call late, exactly all along."""
    B = torch.randn(SHAPE[2], SHAPE[1])
    blocks, pieces = operand((32, 32), 0.9, seed=1), operand((32, 1), 0.95, seed=2)
    select = cost_model.select_without_waiting
    first = select(blocks, B)
    assert first.micro_tile == select_micro_tile(blocks, B).micro_tile == (32, 32)
    assert sorted(detections[:2]) == [(32, 1), (32, 32)]
    detections.clear()
    second = select(pieces, B)  # the blocks' counts still rule
    assert second.micro_tile == (32, 32) and second.listed == first.listed
    assert detections == [(32, 32), (32, 1)]  # the choice, then its only rival
    assert select(pieces, B).micro_tile == (32, 1) == select_micro_tile(pieces, B).micro_tile
    for A in (blocks, pieces, pieces):  # exact whatever the (late) choice
        torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile="auto"), A @ B, rtol=1e-5, atol=1e-4)


def test_auto_probes_a_rival_predicted_far_slower_one_call_in_eight(process_database, detections):
    """Scattered pieces: 32x32 blocks could only win if the pattern changed (their bound is
    below the pieces' time, their prediction far above): counted again every eighth call."""
    A, B = operand((32, 1), 0.95), torch.randn(SHAPE[2], SHAPE[1])
    assert cost_model.select_without_waiting(A, B).micro_tile == (32, 1)  # counts both
    detections.clear()
    for _ in range(16):
        assert cost_model.select_without_waiting(A, B).micro_tile == (32, 1)
    assert detections.count((32, 1)) == 16 and detections.count((32, 32)) == 2


def test_auto_detects_nothing_where_dense_is_sure_to_win(process_database, detections):
    A, B = operand((32, 1), 0.5), torch.randn(SHAPE[2], SHAPE[1])
    cost_model.select_without_waiting(A, B)  # the first call counts every candidate
    record_dense(process_database, 1e-6)  # a new database version: counted afresh once more
    assert cost_model.select_without_waiting(A, B).dense
    detections.clear()
    assert cost_model.select_without_waiting(A, B).dense and detections == []


def test_predictions_scale_within_a_bucket_and_over_a_batch(db):
    A, B = operand((32, 1), 0.9), torch.randn(SHAPE[2], SHAPE[1])
    one = select_micro_tile(A, B, database=db)
    batched = select_micro_tile(A.expand(2, -1, -1), B.expand(2, -1, -1), database=db)
    assert batched.listed["32x1"] == 2 * one.listed["32x1"]
    assert batched.predicted_ms["dense"] == pytest.approx(2 * one.predicted_ms["dense"])
    half_n = select_micro_tile(A, B[:, :129], database=db)  # same bucket, about half the work per tile
    assert half_n.predicted_ms["32x1"] < 0.6 * one.predicted_ms["32x1"]


def test_without_entries_auto_uses_the_default_and_logs_once(caplog):
    empty = TileDatabase(None)
    A, B = torch.randn(40, 24), torch.randn(24, 8)
    with caplog.at_level(logging.DEBUG, logger="pit_compiler.tuning.cost_model"):
        first = select_micro_tile(A, B, database=empty)
        second = select_micro_tile(A, B, database=empty)
    assert first.micro_tile == second.micro_tile == DEFAULT_MICRO_TILE
    assert first.source == "default" and first.predicted_ms == {}
    assert caplog.text.count("no tuned PIT kernels") == 1 and "pit-tune matmul --shape 40x8x24" in caplog.text


@pytest.fixture
def process_database(db):
    set_tile_database(db)
    yield db
    set_tile_database(None)


@pytest.mark.parametrize("pattern, expected", [((32, 1), (32, 1)), ((32, 32), (32, 32))])
def test_sparse_matmul_auto_runs_the_selected_micro_tile(process_database, pattern, expected, monkeypatch):
    A, B = operand(pattern, 0.9), torch.randn(SHAPE[2], SHAPE[1])
    assert pit.select_micro_tile(A, B).micro_tile == expected
    tiles = []
    original = api.pit_matmul
    monkeypatch.setattr(api, "pit_matmul", lambda A, B, out, sparse, tile, *rest, **kw: tiles.append(tuple(tile)) or original(A, B, out, sparse, tile, *rest, **kw))
    torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile="auto"), A @ B, rtol=1e-5, atol=1e-4)
    assert tiles == [expected]
    out = torch.empty(SHAPE[0], SHAPE[1])
    assert pit.sparse_matmul(A, B, micro_tile="auto", out=out) is out
    torch.testing.assert_close(out, A @ B, rtol=1e-5, atol=1e-4)


def test_sparse_matmul_auto_dense_fallback_applies_the_mask_first(process_database, monkeypatch):
    record_dense(process_database, 0.0001)
    A, B = torch.randn(SHAPE[0], SHAPE[2]), torch.randn(SHAPE[2], SHAPE[1])
    mask = torch.rand(A.shape) < 0.3
    calls = []
    monkeypatch.setattr(api, "sparse_matmul_op", lambda *a: calls.append(a))
    monkeypatch.setattr(api, "pit_matmul", lambda *a, **kw: calls.append(a))
    expected = (A * mask) @ B
    torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile="auto", mask=mask), expected, rtol=1e-5, atol=1e-4)
    assert calls == []  # dense: no PIT kernel ran


def test_sparse_matmul_auto_with_a_mask_and_sparse_b(process_database):
    A, B = torch.randn(32, 64), torch.randn(64, 48)
    mask = torch.rand(64, 48) < 0.5
    C = pit.sparse_matmul(A, B, sparse="B", micro_tile="auto", mask=mask)  # nothing tuned for B: default
    torch.testing.assert_close(C, A @ (B * mask), rtol=1e-5, atol=1e-4)


def test_auto_argument_errors_name_the_argument():
    A, B = torch.randn(64, 64), torch.randn(64, 64)
    with pytest.raises(ValueError, match="micro_tile"):
        pit.sparse_matmul(A, B, micro_tile="fast")
    with pytest.raises(ValueError, match="sparse='C'"):
        pit.sparse_matmul(A, B, sparse="C", micro_tile="auto", mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="form="):
        pit.sparse_matmul(A, B, micro_tile="auto", form="reduce")
    with pytest.raises(ValueError, match="mask must have the sparse operand's shape"):
        pit.sparse_matmul(A, B, micro_tile="auto", mask=torch.ones(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparse must be"):
        pit.select_micro_tile(A, B, sparse="C")


@pytest.mark.parametrize(
    "tile,layout,reused",
    [((32, 1), "plain", True), ((32, 32), "batched", True), ((1, 32), "plain", False)],
    ids=str,
)
def test_auto_runs_on_its_own_detection_where_the_kernel_reads_it(tile, layout, reused, monkeypatch):
    """The chosen candidate's detection is not repeated where the kernel reads the same lists
    (blocks of stored rows: the reduce form of A stored (m, k)); elsewhere it detects again.
    Either way the product is exact."""
    from pit_compiler import ops

    database = TileDatabase(None)
    record_kernel(database, tile, 0.01, 0.001)
    record_dense(database, 100.0)
    A = micro_tile_sparse((SHAPE[0] - 6, SHAPE[2]), tile, 0.3, torch.float32, seed=4)[0]  # a tail of rows
    B = torch.randn(SHAPE[2], SHAPE[1])
    if layout == "batched":
        A, B = torch.stack([A, A.roll(32, 0)]), torch.stack([B, B])
    out = poisoned((*A.shape[:-1], SHAPE[1]), torch.float32, "cpu")
    detections = []
    original = ops.index_for
    monkeypatch.setattr(ops, "index_for", lambda *a: detections.append(a[0].form) or original(*a))
    set_tile_database(database)
    try:
        assert pit.select_micro_tile(A, B).micro_tile == tile
        assert pit.sparse_matmul(A, B, micro_tile="auto", out=out) is out
    finally:
        set_tile_database(None)
    assert len(detections) == (0 if reused else 1), detections
    assert_matches_reference(out, A.double() @ B.double())


@pytest.mark.parametrize(
    "tile,transposed,batched,reads",
    [((32, 1), False, False, True), ((64, 64), False, True, True), ((32, 1), True, False, False),
     ((1, 32), False, False, False), ((1, None), False, False, False)],
    ids=str,
)
def test_which_kernels_read_the_row_block_lists(tile, transposed, batched, reads):
    """Only a kernel that lists blocks of the stored rows can take auto's detection as is."""
    from pit_compiler import ops

    M, N, K = SHAPE
    stored = tile[::-1] if transposed else tile
    stored = tuple(K if t is None else t for t in stored)
    contraction = matmul_contraction(3 if batched else 2, transposed, False)
    plan = plan_pit(contraction, SparsityAttr("A", stored), {"m": M, "n": N, "k": K})
    assert ops.reads_row_blocks(plan) is reads
