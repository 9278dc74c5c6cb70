"""The tuner on the CPU target: measurements persisted, checked, resumable, capped, replayed."""

import pytest
import torch
from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig
from tvm.target import Target

import pit_compiler as pit
import pit_compiler.ops as ops
from pit_compiler.ir import SparsityAttr, plan_pit
from pit_compiler.schedules import CpuParallel
from pit_compiler.tuning import TileDatabase, format_report, set_tile_database, tune_matmul, tuned_knobs
from pit_compiler.tuning import tuner
from pit_compiler.tuning.database import dense_workload, workload_key
from cuda_build import SM90

FAST = EvaluatorConfig(number=1, repeat=1, min_repeat_ms=1, enable_cpu_cache_flush=False)
SHAPE = (64, 64, 64)


def tune(db, **kwargs):
    options = dict(micro_tiles=[(32, 1)], sparsities=[0.5, 0.9], target="llvm", database=db, evaluator=FAST, progress=False)
    return tune_matmul(SHAPE, "float32", **{**options, **kwargs})


def points(db, key):
    return {name for name, m in db.get(key)["measurements"].items() if "ms" in m}


def test_every_knob_and_sparsity_is_measured_and_persisted(tmp_path):
    db = TileDatabase(tmp_path / "tiles.json")
    report = tune(db, micro_tiles=[(32, 1), (1, 32)])
    (k32, k1) = report.kernels
    assert (k32.form, k1.form) == ("reduce", "scatter")
    space = len(list(CpuParallel().space(Target("llvm"))))
    assert [k.measured for k in report.kernels] == [2 * space, 2 * space]
    stored = TileDatabase(tmp_path / "tiles.json")
    for kernel in report.kernels:
        entry = stored.get(kernel.key)
        assert len(points(stored, kernel.key)) == 2 * space
        assert "64x64x64" in entry["detect"]
        assert {m["listed"] for m in entry["measurements"].values()} == {64, 13}  # round((1 - s) * 128)
        assert kernel.best_knobs in ({"parallel": True}, {"parallel": False}) and kernel.b_ms >= 0
    dense = stored.get(workload_key(dense_workload(SHAPE, "float32", Target("llvm"))))
    assert report.dense_ms == dense["measurements"]["64x64x64"]["ms"] > 0
    table = format_report(report)
    assert "32x1" in table and "1x32" in table and "dense torch.matmul" in table


def test_interrupted_run_resumes_with_only_the_rest(tmp_path):
    db = TileDatabase(tmp_path / "tiles.json")
    seen = []

    def interrupt_after_two(measurement):
        seen.append(measurement)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(db, on_measurement=interrupt_after_two)
    key = workload_key(_workload_of(db))
    assert len(points(TileDatabase(tmp_path / "tiles.json"), key)) == 2

    again = []
    report = tune(TileDatabase(tmp_path / "tiles.json"), on_measurement=again.append)
    done = {(m.knobs["parallel"], m.sparsity) for m in seen}
    rest = {(m.knobs["parallel"], m.sparsity) for m in again}
    assert len(again) == 2 and not done & rest
    assert report.kernels[0].reused == 2 and report.kernels[0].measured == 2
    assert len(points(db, key)) == 4


def _workload_of(db):
    (entry,) = [e for e in db.entries().values() if e["workload"]["op"] == "pit_matmul"]
    return entry["workload"]


def test_trials_cap_counts_what_the_database_holds(tmp_path):
    db = TileDatabase(tmp_path / "tiles.json")
    first = tune(db, trials=3)
    assert first.kernels[0].measured == 3
    second = tune(db, trials=3)
    assert (second.kernels[0].measured, second.kernels[0].reused) == (0, 3)
    third = tune(db, trials=4)
    assert third.kernels[0].measured == 1


def test_a_kernel_that_fails_the_torch_check_is_rejected_and_never_retried(tmp_path, monkeypatch):
    monkeypatch.setitem(tuner.TOLERANCE, "float32", -1.0)  # nothing can pass
    db = TileDatabase(tmp_path / "tiles.json")
    report = tune(db)
    assert report.kernels[0].measured == 0 and report.kernels[0].failed == 2
    assert report.kernels[0].best_knobs is None
    entry = db.get(report.kernels[0].key)
    assert all("differs from dense torch" in m["error"] for m in entry["measurements"].values())
    assert tune(db).kernels[0].failed == 0  # rejected knobs are skipped, not measured again


def test_runtime_replays_the_best_knobs(tmp_path, monkeypatch):
    db = TileDatabase(tmp_path / "tiles.json")
    report = tune(db, micro_tiles=[(32, 1)])
    best = report.kernels[0].best_knobs
    # Make the non-default setting the best, so replay is visible.
    entry_key = report.kernels[0].key
    slow = {"parallel": not best["parallel"]}

    def favour(entries):
        for m in entries[entry_key]["measurements"].values():
            m["ms"] = 1.0 if m["knobs"] == slow else 5.0

    db.update(favour)
    used = []
    original = ops.matmul_kernel

    def spy(plan, dtype, out_dtype, target, cache, knobs=None):
        used.append(knobs)
        return original(plan, dtype, out_dtype, target, cache, knobs)

    monkeypatch.setattr(ops, "matmul_kernel", spy)
    set_tile_database(db)
    try:
        A = torch.randn(3, 64, 48)  # batched, another shape of the bucket: the 2-D tuning serves it
        A[:, :, torch.rand(48) < 0.5] = 0
        B = torch.randn(3, 48, 40)
        torch.testing.assert_close(pit.sparse_matmul(A, B, micro_tile=(32, 1)), A @ B, rtol=1e-5, atol=1e-4)
        pit.sparse_matmul(A[0], B[0], micro_tile=(32, 1))
        pit.sparse_matmul(A[0], B[0], micro_tile=(1, 16))  # not tuned: defaults
    finally:
        set_tile_database(None)
    assert used == [CpuParallel.Knobs(**slow), CpuParallel.Knobs(**slow), None]


@pytest.mark.parametrize("layout, sparse", [("nt", "A"), ("tn", "A"), ("nt", "B")])
def test_a_transposed_layout_is_tuned_for_its_own_kernel_and_selected_for_it(tmp_path, layout, sparse):
    # "nt" with sparse A is x @ W.t() of an nn.Linear: the weight is read in place, transposed.
    db = TileDatabase(tmp_path / "tiles.json")
    report = tune(db, micro_tiles=[(32, 1), (1, 32)], layout=layout, sparse=sparse)
    assert all(k.measured > 0 and k.failed == 0 for k in report.kernels)
    assert report.layout == layout and f"layout {layout}" in format_report(report)
    plain = tune(TileDatabase(tmp_path / "plain.json"), micro_tiles=[(32, 1)], sparse=sparse)
    assert plain.kernels[0].key != report.kernels[0].key  # another storage order, another kernel

    M, N, K = SHAPE
    A, B = torch.randn(M, K), torch.randn(K, N)
    A, B = (A.t().contiguous().t() if layout[0] == "t" else A), (B.t().contiguous().t() if layout[1] == "t" else B)
    sparse_operand = A if sparse == "A" else B
    with torch.no_grad():
        sparse_operand[:, ::3] = 0  # whole columns: the tuned micro-tiles see real sparsity
    set_tile_database(db)
    try:
        choice = pit.select_micro_tile(A, B, sparse)
        assert choice.source == "database" and {"32x1", "1x32"} <= set(choice.predicted_ms)
        out = torch.full((M, N), float("nan"))
        pit.sparse_matmul(A, B, sparse=sparse, micro_tile="auto", out=out)
    finally:
        set_tile_database(None)
    torch.testing.assert_close(out, A @ B, rtol=1e-5, atol=1e-4)


def test_nt_is_tuned_as_run_time_reads_it_where_b_comes_from_its_compact_copy(tmp_path, monkeypatch):
    """Where a tensor-core tile reads only B stored (k, n) (Hopper; patched in here), run time
    reads an nn.Linear weight from its compact copy, so "nt" tunes that kernel ("nn")."""
    def compact_only(plan, *facts):
        return "reduce" if plan.contraction.order("b") == ("k", "n") else None

    monkeypatch.setattr(ops, "tensor_core_kernel", compact_only)  # ops' decision only: the CPU kernels still run
    report = tune(TileDatabase(tmp_path / "tiles.json"), micro_tiles=[(32, 1)], layout="nt")
    plain = tune(TileDatabase(tmp_path / "plain.json"), micro_tiles=[(32, 1)])
    assert report.kernels[0].measured > 0 and report.kernels[0].failed == 0
    assert report.kernels[0].key == plain.kernels[0].key  # the compact layout's kernel


def test_tuned_knobs_is_none_without_a_database(tmp_path):
    plan = plan_pit(ops.matmul_contraction(2), SparsityAttr("A", (32, 1)), {"m": 64, "n": 64, "k": 64})
    A, B = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    assert tuned_knobs(plan, "float32", Target("llvm"), A, B, TileDatabase(tmp_path / "none.json")) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (64, 64)}, "shape"),
        ({"dtype": "int8"}, "dtype"),
        ({"sparsities": [1.5]}, "sparsities"),
        ({"sparse": "C"}, "sparse"),
        ({"trials": 0}, "trials"),
        ({"target": "rocm"}, "target"),
        ({"layout": "nx"}, "layout"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    options = {"shape": SHAPE, "dtype": "float32", "database": TileDatabase(None), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        tune_matmul(options.pop("shape"), options.pop("dtype"), **options)


@pytest.mark.parametrize("reads_as_stored", [False, True])
@pytest.mark.parametrize("micro_tile, k_major", [((1, None), True), ((64, 64), True), ((32, 1), False)], ids=str)
def test_a_linear_weight_layout_tunes_the_kernel_run_time_takes(micro_tile, k_major, reads_as_stored, tmp_path, monkeypatch):
    """``--layout nt`` (x @ W.t()) on an sm_90 target: the tuner measures W read in place
    (K-major) where run time reads it so (``READS_B_AS_STORED``, chunks of 8 or more), else W's
    compact copy, as run time reads it then."""
    from pit_compiler.codegen import warpgroup

    monkeypatch.setattr(warpgroup, "READS_B_AS_STORED", reads_as_stored)
    db = TileDatabase(tmp_path / "tiles.json")
    run = tuner._Run((256, 384, 512), "float16", "A", (False, True), (0.9,), torch.device("cpu"), SM90, db, EvaluatorConfig(), 0)
    task = run.plan(0, micro_tile, 1000, tuner.TuneReport(run.shape, "float16", "A", str(SM90), str(db.path)))
    in_place = k_major and reads_as_stored
    assert task.compact_b == (not in_place)
    assert task.plan.contraction.order("b") == (("n", "k") if in_place else ("k", "n"))
    assert task.dedicated in ("row_gather", "reduce") and task.todo


def test_strips_measure_16_bit_adds_only_where_pytorch_allows_reduced_precision_sums(tmp_path, reduced_precision_reductions):
    """With PyTorch's switch for reduced-precision float16 reductions off, the strips' settings
    with 16-bit adds are not measured (run time would add in float32 with them)."""
    reduced_precision_reductions(torch.float16, False)
    run = tuner._Run((256, 384, 512), "float16", "A", (False, False), (0.9,), torch.device("cpu"), SM90,
                     TileDatabase(tmp_path / "tiles.json"), EvaluatorConfig(), 0)
    task = run.plan(0, (1, 32), 1000, tuner.TuneReport(run.shape, "float16", "A", str(SM90), str(tmp_path / "tiles.json")))
    knobs = [k for k, _ in task.todo]
    assert task.dedicated == "strips" and len(knobs) == 21 and not any(k.adds16 for k in knobs)


@pytest.mark.parametrize(
    "micro_tile, dtype, kernel, template",
    [((32, 1), "float16", "reduce", "warpgroup_matmul"), ((16, 32), "float16", "reduce", "tensor_core_matmul"),
     ((1, None), "float16", "row_gather", "warpgroup_matmul"),
     ((64, 64), "bfloat16", "reduce", "warpgroup_matmul"), ((32, 1), "float32", None, "simt_threads"),
     ((1, 32), "float16", "strips", "warpgroup_matmul"), ((1, 4), "float16", None, "simt_threads")],
    ids=str,
)
def test_cuda_tasks_measure_the_kernel_run_time_takes(micro_tile, dtype, kernel, template, tmp_path):
    """Planned for an sm_90 target (built here, never run): a micro-tile that run time sends to
    a tensor-core tile (the warpgroup tile first) is keyed by that tile's template and measured
    over its knob space."""
    from pit_compiler.codegen.reduce_matmul import reduce_tile_knobs, reduce_tile_space
    from pit_compiler.codegen.warpgroup import warpgroup_knobs, warpgroup_space
    from pit_compiler.tuning.cost_model import kernel_template

    db = TileDatabase(tmp_path / "tiles.json")
    run = tuner._Run((256, 384, 512), dtype, "A", (False, False), (0.9,), torch.device("cpu"), SM90, db,
                     EvaluatorConfig(), 0)
    report = tuner.TuneReport(run.shape, dtype, "A", str(SM90), str(db.path))
    task = run.plan(0, micro_tile, 1000, report)
    assert task.dedicated == kernel
    assert task.workload["template"]["name"] == template
    assert kernel_template(task.plan, run.shape, dtype, SM90).name == template
    knobs = [k for k, _ in task.todo]
    if template == "warpgroup_matmul":  # Hopper's tiles: whole rows, 32-, 64- or 128-row blocks, strips
        default = warpgroup_knobs(task.plan, 2, 512, 384, dtype, dtype, dtype, SM90)
        assert knobs == warpgroup_space(default, task.plan)
        assert any(k.adds16 for k in knobs) == (kernel == "strips")  # PyTorch allows 16-bit sums by default
    elif kernel == "reduce":
        default = reduce_tile_knobs(task.plan, 2, 512, 384, dtype, dtype, SM90)
        assert knobs == reduce_tile_space(default, 384)
    elif kernel == "row_gather":
        assert knobs == [ops.ROW_GATHER_KNOBS]
    else:
        assert knobs == run.space
