"""The tuner: compile each knob setting with TVM, check it once against torch, time it, persist.

Reused from TVM: every PIT kernel is timed by ``Module.time_evaluator``, the timer
meta-schedule's runners call (CUDA events on a GPU, the CPU clock on llvm), configured by
meta-schedule's ``EvaluatorConfig``; builds go through the project's ``matmul_module`` and
kernel cache, so the kernels the tuner times are the ones later runs load. Hand-written:

- the search loop: meta-schedule cannot build gathered kernels (``Multiple buffer read`` in
  its auto-copy lowering, TVM-NOTES.md) and searches schedule traces, where PIT's space is a
  template's typed knobs (``space(target)``), replayed through ``apply``;
- :func:`time_callable`, for what has no TVM module (dense ``torch.matmul``, detection as
  run-time calls it): CUDA events on a GPU, with time_evaluator's number/repeat/min_repeat_ms.

Each measurement is written to the database as soon as it is taken, so an interrupted run
(Ctrl-C) loses nothing and the next run measures only what is missing.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import tvm
from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig
from tvm.target import Target

from pit_compiler.codegen import matmul_module
from pit_compiler.codegen.reduce_matmul import reduce_tile_knobs, reduce_tile_space
from pit_compiler.codegen.warpgroup import warpgroup_knobs, warpgroup_space
from pit_compiler.ir import PITError, SparsityAttr, plan_pit
from pit_compiler import ops
from pit_compiler.ops import (
    batched,
    index_for,
    kernel_cache,
    matmul_contraction,
    result_dtype,
    storage,
    tensor_core_kernel,
    tvm_dtype,
)
from pit_compiler.schedules import template_for
from pit_compiler.targets import target_for
from pit_compiler.testing import elapsed_ms
from pit_compiler.validation import normalize_micro_tile

from .cost_model import best_knobs, kernel_model, kernel_template, tile_label
from .database import (
    TileDatabase,
    dense_workload,
    knobs_text,
    matmul_workload,
    shape_text,
    target_label,
    tile_database,
    workload_key,
)
from .progress import Progress

log = logging.getLogger(__name__)

DEFAULT_EVALUATOR = EvaluatorConfig(number=1, repeat=5, min_repeat_ms=50, enable_cpu_cache_flush=False)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Of the largest reference entry: float32 sums exactly enough; half types round the output.
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
# How A and B are stored, BLAS style: "n" as written, "t" a transposed view. "nt" is
# ``x @ W.t()`` of an ``nn.Linear``, whose kernels read the weight in place (``ops.storage``).
LAYOUTS = ("nn", "nt", "tn", "tt")


def resolve_target(target: str | None) -> tuple[torch.device, Target]:
    """``"cuda"``, ``"llvm"`` or None (cuda when a GPU is present): the device and TVM target."""
    if target is None:
        target = "cuda" if torch.cuda.is_available() else "llvm"
    if target not in ("cuda", "llvm"):
        raise ValueError(f"target must be 'cuda' or 'llvm', got {target!r}")
    if target == "cuda" and not torch.cuda.is_available():
        raise ValueError("target 'cuda' needs a CUDA GPU, but torch.cuda.is_available() is False; use 'llvm'")
    device = torch.device("cuda", torch.cuda.current_device()) if target == "cuda" else torch.device("cpu")
    return device, target_for(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kernel(module, device: torch.device, args, config: EvaluatorConfig = DEFAULT_EVALUATOR) -> float:
    """Median ms of ``module["main"](*args)`` by TVM's ``time_evaluator``."""
    runnable = module.jit() if isinstance(module, tvm.runtime.Executable) else module
    dev = tvm.cuda(device.index or 0) if device.type == "cuda" else tvm.cpu(0)
    _synchronize(device)
    evaluator = runnable.time_evaluator(
        "main", dev, number=config.number, repeat=config.repeat, min_repeat_ms=config.min_repeat_ms
    )
    return float(evaluator(*args).median) * 1e3


def time_callable(fn, device: torch.device, config: EvaluatorConfig = DEFAULT_EVALUATOR) -> float:
    """Median ms per call of ``fn``, as ``time_evaluator`` counts (CUDA events on a GPU)."""
    fn()  # warm-up: lazy initialization, kernel loads
    number, means = max(1, config.number), []
    for _ in range(max(1, config.repeat)):
        while True:
            _synchronize(device)
            elapsed = elapsed_ms(fn, device, number)
            if elapsed >= config.min_repeat_ms or number >= 1 << 20:
                break
            # Grow the batch until it lasts min_repeat_ms, as time_evaluator does.
            number = max(int(number * 1.618) + 1, int(number * config.min_repeat_ms / max(elapsed, 1e-3)) + 1)
        means.append(elapsed / number)
    return statistics.median(means)


def micro_tile_operand(shape, tile, sparsity: float, dtype, device, seed: int) -> tuple[torch.Tensor, int, int]:
    """A random ``shape`` tensor with exactly ``round((1 - sparsity) * tiles)`` non-empty micro-tiles.

    Values are shifted away from zero, so a kept micro-tile is never accidentally empty.
    Returns the tensor, the listed micro-tiles and all micro-tiles.
    """
    rows, cols = shape
    grid = (math.ceil(rows / tile[0]), math.ceil(cols / tile[1]))
    tiles = grid[0] * grid[1]
    keep = round((1.0 - sparsity) * tiles)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(tiles, dtype=torch.bool)
    mask[torch.randperm(tiles, generator=generator)[:keep]] = True
    mask = mask.view(grid).to(device)
    values = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    values += torch.sign(values) * 0.25
    full = mask.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:rows, :cols]
    return (values * full).to(dtype), keep, tiles


@dataclass(frozen=True)
class Measurement:
    """One (knobs, sparsity) point: ``status`` is measured, reused (from the database) or failed."""

    micro_tile: tuple
    knobs: dict
    sparsity: float
    ms: float | None
    listed: int | None
    tiles: int | None
    status: str
    error: str | None = None


@dataclass
class KernelSummary:
    """A tuned micro-tile: its database key, best knobs, fitted line and tuning time."""

    micro_tile: tuple
    form: str
    key: str
    best_knobs: dict | None = None
    a_ms: float | None = None
    b_ms: float | None = None
    detect_ms: float | None = None
    tuning_s: float = 0.0
    measured: int = 0
    reused: int = 0
    failed: int = 0


@dataclass
class TuneReport:
    shape: tuple
    dtype: str
    sparse: str
    target: str
    database: str
    layout: str = "nn"
    dense_ms: float | None = None
    kernels: list = field(default_factory=list)
    measurements: list = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sparse": self.sparse,
            "target": self.target,
            "database": self.database,
            "layout": self.layout,
            "dense_ms": self.dense_ms,
            "elapsed_s": self.elapsed_s,
            "kernels": [{**vars(k), "micro_tile": list(k.micro_tile)} for k in self.kernels],
            "measurements": [{**vars(m), "micro_tile": list(m.micro_tile)} for m in self.measurements],
        }


def _check_arguments(shape, dtype, micro_tiles, sparsities, sparse, trials, layout):
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"shape must be (M, N, K) of positive ints, got {shape!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not micro_tiles:
        raise ValueError("micro_tiles must name at least one micro-tile, e.g. [(32, 1)]")
    if not sparsities or not all(isinstance(s, (int, float)) and 0.0 <= s <= 1.0 for s in sparsities):
        raise ValueError(f"sparsities must be fractions in [0, 1], got {sparsities!r}")
    if sparse not in ("A", "B"):
        raise ValueError(f"sparse must be 'A' or 'B', got {sparse!r}")
    if not (isinstance(trials, int) and trials >= 1):
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} (n: as written, t: a transposed view), got {layout!r}")


def tune_matmul(
    shape,
    dtype: str = "float32",
    micro_tiles=((32, 1),),
    sparsities=(0.5, 0.9, 0.99),
    *,
    sparse: str = "A",
    layout: str = "nn",
    target: str | None = None,
    trials: int = 64,
    database: TileDatabase | None = None,
    evaluator: EvaluatorConfig = DEFAULT_EVALUATOR,
    seed: int = 0,
    progress: bool = True,
    on_measurement=None,
) -> TuneReport:
    """Measure PIT kernels of ``sparse @ dense`` (``shape`` is ``(M, N, K)``) into ``database``.

    For each micro-tile, every knob setting of the target's template is built, checked once
    against dense torch, then timed at each sparsity; at most ``trials`` (knobs, sparsity)
    points per micro-tile, counting those already in the database (so a rerun measures only
    what is missing). Dense ``torch.matmul`` and detection are timed once per shape. ``layout``
    says how A and B are stored (:data:`LAYOUTS`): a kernel is tuned for one storage order.
    ``on_measurement(measurement)`` is called after each point is saved.
    """
    _check_arguments(shape, dtype, micro_tiles, sparsities, sparse, trials, layout)
    start = time.perf_counter()
    device, tvm_target = resolve_target(target)
    db = database if database is not None else tile_database()
    transposed = (layout[0] == "t", layout[1] == "t")
    run = _Run(tuple(shape), dtype, sparse, transposed, tuple(sparsities), device, tvm_target, db, evaluator, seed)
    report = TuneReport(run.shape, dtype, sparse, str(tvm_target), str(run.db.path), layout)
    # Step 1. Plan every micro-tile: the points still to measure, those the database holds.
    tasks = [run.plan(number, tuple(tile), trials, report) for number, tile in enumerate(micro_tiles)]
    dense = dense_workload(run.shape, dtype, tvm_target)
    dense_entry = run.db.get(workload_key(dense))
    needs_dense = dense_entry is None or shape_text(run.shape) not in dense_entry["measurements"]
    with Progress(sum(len(t.todo) + t.needs_detect for t in tasks) + needs_dense, "pit-tune", enabled=progress) as bar:
        # Step 2. The dense fallback, once per shape.
        if needs_dense:
            ms = run.time_dense()
            run.db.record(dense, shape_text(run.shape), {"shape": list(run.shape), "ms": ms})
            bar.update(note=f"dense torch.matmul {ms:.4f} ms")
        entry = run.db.get(workload_key(dense))
        report.dense_ms = entry["measurements"][shape_text(run.shape)]["ms"]
        # Step 3. Each micro-tile: detection, then every (knobs, sparsity) point left.
        for task in tasks:
            run.tune(task, bar, report, on_measurement)
    report.elapsed_s = time.perf_counter() - start
    return report


@dataclass
class _Task:
    """One micro-tile's share of a tuning run."""

    number: int
    tile: tuple  # concrete (rows, cols)
    plan: object
    workload: dict
    todo: list  # (knobs, sparsity) still to measure
    needs_detect: bool
    dedicated: str | None  # the dedicated kernel run time uses (ops.tensor_core_path): time that one
    summary: KernelSummary
    compact_b: bool = False  # B transposed, read from its compact copy as run time does (ops.COMPACT_COPIES)


@dataclass
class _Run:
    """What every step of one tuning run shares."""

    shape: tuple
    dtype: str
    sparse: str
    transposed: tuple  # (A, B): stored as a transposed view
    sparsities: tuple
    device: torch.device
    target: Target
    db: TileDatabase
    evaluator: EvaluatorConfig
    seed: int

    def __post_init__(self):
        M, N, K = self.shape
        self.torch_dtype = DTYPES[self.dtype]
        self.template = template_for(self.target)
        self.space = list(self.template.space(self.target))
        self.operand_shape = (M, K) if self.sparse == "A" else (K, N)
        dense_shape = (K, N) if self.sparse == "A" else (M, K)
        dense = torch.randn(dense_shape, generator=torch.Generator().manual_seed(self.seed + 1))
        self.dense_operand = self._stored(dense.to(device=self.device, dtype=self.torch_dtype), self.sparse == "A")
        self.sparse_transposed = self.transposed[0 if self.sparse == "A" else 1]

    def _stored(self, logical: torch.Tensor, is_b: bool) -> torch.Tensor:
        """``logical`` with its layout's storage: as written, or a transposed view."""
        return logical.t().contiguous().t() if self.transposed[int(is_b)] else logical

    def _storage_tile(self, tile: tuple) -> tuple:
        """A logical micro-tile (or grid) of the sparse operand in its storage order."""
        return tile[::-1] if self.sparse_transposed else tile

    def plan(self, number: int, micro_tile: tuple, trials: int, report: TuneReport) -> _Task:
        M, N, K = self.shape
        tile = normalize_micro_tile(micro_tile, self.operand_shape)
        compact_b = self._reads_compact_b(tile)
        contraction = matmul_contraction(2, self.transposed[0], self.transposed[1] and not compact_b)
        plan = plan_pit(contraction, SparsityAttr(self.sparse, self._storage_tile(tile)), {"m": M, "n": N, "k": K})
        dedicated = tensor_core_kernel(plan, 2, K, N, self.dtype, self.dtype, self.dtype, self.target)
        template = kernel_template(plan, self.shape, self.dtype, self.target)
        workload = matmul_workload(plan, self.shape, self.dtype, self.target, template)
        summary = KernelSummary(micro_tile, plan.form, workload_key(workload))
        entry = self.db.get(summary.key) or {"measurements": {}, "detect": {}}
        done = entry["measurements"]
        failed = {name.split("/")[1] for name in done if name.endswith("/failed")}
        space = self._space(dedicated, plan)
        points = [(k, s) for k in space if knobs_text(k) not in failed for s in self.sparsities]
        names = [_point_name(self.shape, k, s) for k, s in points]
        budget = max(0, trials - sum(name in done for name in names))
        todo = [p for p, name in zip(points, names) if name not in done][:budget]
        for (knobs, s), name in zip(points, names):
            if "ms" in done.get(name, {}):
                m = done[name]
                reused = Measurement(micro_tile, m["knobs"], s, m["ms"], m["listed"], m["tiles"], "reused")
                report.measurements.append(reused)
                summary.reused += 1
        needs_detect = shape_text(self.shape) not in entry.get("detect", {})
        return _Task(number, tile, plan, workload, todo, needs_detect, dedicated, summary, compact_b)

    def _reads_compact_b(self, tile: tuple) -> bool:
        """Whether run time reads this layout's transposed B from a compact copy for ``tile``
        (a tensor-core tile takes only that layout): then that is what is tuned."""
        if self.sparse != "A" or not self.transposed[1]:
            return False
        M, N, K = self.shape
        facts = (2, K, N, self.dtype, self.dtype, self.dtype, self.target)
        return ops.compact_b_reaches_tensor_cores(facts, self.transposed[0], self._storage_tile(tile), {"m": M, "n": N, "k": K})

    def _space(self, dedicated: str | None, plan) -> list:
        """The knob settings to measure: the target template's space, or the dedicated kernel's."""
        M, N, K = self.shape
        warpgroup = warpgroup_knobs(plan, 2, K, N, self.dtype, self.dtype, self.dtype, self.target)
        if warpgroup is not None:  # 16-bit adds only where PyTorch allows reduced-precision sums
            allowed = ops.reduced_precision_allowed(self.torch_dtype)
            return [knobs for knobs in warpgroup_space(warpgroup, plan) if allowed or not knobs.adds16]
        if dedicated == "reduce":
            return reduce_tile_space(reduce_tile_knobs(plan, 2, K, N, self.dtype, self.dtype, self.target), N)
        if dedicated == "row_gather":
            return [ops.ROW_GATHER_KNOBS]
        return self.space

    def time_dense(self) -> float:
        M, N, K = self.shape
        a = self._stored(torch.randn(M, K, device=self.device, dtype=self.torch_dtype), False)
        b = self._stored(torch.randn(K, N, device=self.device, dtype=self.torch_dtype), True)
        c = torch.empty(M, N, device=self.device, dtype=self.torch_dtype)
        return time_callable(lambda: torch.matmul(a, b, out=c), self.device, self.evaluator)

    def data(self, task: _Task, sparsity: float, cache: dict):
        """``(A, B, index, listed, tiles)`` with ``task``'s micro-tiles at ``sparsity``.

        A and B are logical (possibly transposed views); kernels take their storage.
        """
        if sparsity not in cache:
            seed = self.seed + 1000 * task.number + round(sparsity * 1e4)
            operand, listed, tiles = micro_tile_operand(
                self.operand_shape, task.tile, sparsity, self.torch_dtype, self.device, seed
            )
            operand = self._stored(operand, self.sparse == "B")
            index = self.detect(task, operand)
            dense = self.dense_operand.contiguous() if task.compact_b else self.dense_operand
            A, B = (operand, dense) if self.sparse == "A" else (dense, operand)
            cache[sparsity] = (A, B, index, listed, tiles)
        return cache[sparsity]

    def detect(self, task: _Task, operand: torch.Tensor):
        """The index of ``operand``'s listed micro-tiles, as run time builds it."""
        grid = tuple(math.ceil(size / t) for size, t in zip(self.operand_shape, task.tile))
        return index_for(task.plan, storage(operand)[0], None, self._storage_tile(task.tile), self._storage_tile(grid))

    def tune(self, task: _Task, bar: Progress, report: TuneReport, on_measurement) -> None:
        began, data = time.perf_counter(), {}
        micro_tile = task.summary.micro_tile
        label = tile_label(micro_tile)
        if task.needs_detect:
            A, B = self.data(task, self.sparsities[len(self.sparsities) // 2], data)[:2]
            operand = A if self.sparse == "A" else B
            ms = time_callable(lambda: self.detect(task, operand), self.device, self.evaluator)
            self.db.record(task.workload, shape_text(self.shape), {"shape": list(self.shape), "ms": ms}, part="detect")
            bar.update(note=f"{label} detection {ms:.4f} ms")
        checked, rejected = set(), set()
        for knobs, sparsity in task.todo:
            text = knobs_text(knobs)
            if text in rejected:
                continue
            note = f"{label} {task.plan.form} {text} sparsity {sparsity:g}"
            bar.note(note)
            A, B, index, listed, tiles = self.data(task, sparsity, data)
            point = {"knobs": asdict(knobs), "sparsity": sparsity, "shape": list(self.shape), "listed": listed}
            timing = (A, B, index, self.device, self.evaluator, text not in checked)
            try:
                if task.dedicated:
                    ms = _measure_dedicated(task.plan, knobs, *timing)
                else:
                    ms = _measure(task.plan, self.dtype, self.target, knobs, *timing)
            except (PITError, AssertionError) as error:  # InvalidKnobs and CompilationError are PITErrors
                rejected.add(text)
                message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
                log.warning("%s: rejected knobs %s: %s", label, text, message)
                name = f"{shape_text(self.shape)}/{text}/failed"
                self.db.record(task.workload, name, {"knobs": point["knobs"], "error": message})
                ms, status = None, "failed"
                task.summary.failed += 1
            else:
                checked.add(text)
                message, status = None, "measured"
                if task.dedicated:
                    point["path"] = f"tensor_core_{task.dedicated}"
                name = _point_name(self.shape, knobs, sparsity)
                self.db.record(task.workload, name, {**point, "tiles": tiles, "ms": ms})
                task.summary.measured += 1
            measurement = Measurement(micro_tile, point["knobs"], sparsity, ms, listed, tiles, status, message)
            report.measurements.append(measurement)
            bar.update(note=f"{note}: {'failed' if ms is None else f'{ms:.4f} ms'}")
            if on_measurement is not None:
                on_measurement(measurement)
        task.summary.tuning_s = time.perf_counter() - began
        _summarize(task.summary, self.db.get(task.summary.key))
        report.kernels.append(task.summary)


def _point_name(shape, knobs, sparsity: float) -> str:
    return f"{shape_text(shape)}/{knobs_text(knobs)}/{sparsity:g}"


def _check_against_torch(out, A, B, dtype: str) -> None:
    reference = A.double() @ B.double()
    scale = max(reference.abs().max().item(), 1.0)
    error = (out.double() - reference).abs().max().item()
    if not error <= TOLERANCE[dtype] * scale:  # NaN fails too
        raise AssertionError(f"result differs from dense torch by {error:.3g} (allowed {TOLERANCE[dtype] * scale:.3g})")


def _measure_dedicated(plan, knobs, A, B, index, device, evaluator, check: bool) -> float:
    """Check (if asked) and time the dedicated tensor-core kernel with ``knobs`` (ms)."""
    out = torch.empty(A.shape[0], B.shape[1], dtype=A.dtype, device=device)
    a, b = storage(A)[0], storage(B)[0]

    def run():
        assert ops.run_on_tensor_cores(plan, a, b, out, index, knobs), "the dedicated kernel declined"

    if check:
        run()
        _check_against_torch(out, A, B, str(A.dtype).removeprefix("torch."))
    return time_callable(run, device, evaluator)


def _measure(plan, dtype, target, knobs, A, B, index, device, evaluator, check: bool) -> float:
    """Build ``plan`` with ``knobs``, check it against torch if asked, and time it (ms)."""
    out = torch.empty((1, A.shape[0], B.shape[1]), dtype=result_dtype(plan, A.dtype), device=device)
    module = matmul_module(plan, dtype, tvm_dtype(out.dtype, "out"), target, kernel_cache(), knobs)
    args = (batched(storage(A)[0]), batched(storage(B)[0]), out, index.counts, index.indices)
    if check:
        module["main"](*args)
        _check_against_torch(out[0], A, B, dtype)
    return time_kernel(module, device, args, evaluator)


def _summarize(summary: KernelSummary, entry: dict | None) -> None:
    model = kernel_model(entry) if entry is not None else None
    if model is None:
        return
    summary.best_knobs = best_knobs(entry)
    summary.a_ms, summary.b_ms = model.line.a, model.line.b
    detects = [d["ms"] for d in entry.get("detect", {}).values() if "ms" in d]
    summary.detect_ms = detects[-1] if detects else None


def format_report(report: TuneReport) -> str:
    """The final table: every point, then each micro-tile's best knobs and fitted line."""
    where = target_label(report.target)
    lines = [
        f"PIT matmul {shape_text(report.shape)} {report.dtype}, sparse {report.sparse}, layout {report.layout}, on {where}",
        f"{'micro-tile':>10} {'knobs':<22} {'sparsity':>8} {'listed':>8} {'ms':>10}  status",
    ]
    for m in report.measurements:
        ms = "-" if m.ms is None else f"{m.ms:.4f}"
        listed = "-" if m.listed is None else str(m.listed)
        knobs = knobs_text(m.knobs)
        lines.append(f"{tile_label(m.micro_tile):>10} {knobs:<22} {m.sparsity:>8g} {listed:>8} {ms:>10}  {m.status}")
    lines.append("")
    heading = f"{'micro-tile':>10} {'form':<8} {'best knobs':<22} {'ms = a + b * listed':<28}"
    lines.append(f"{heading} {'detect ms':>9} {'tuning s':>8}  key")
    for k in report.kernels:
        knobs = "-" if k.best_knobs is None else knobs_text(k.best_knobs)
        line = "-" if k.a_ms is None else f"{k.a_ms:.4f} + {k.b_ms:.3g} * listed"
        detect = "-" if k.detect_ms is None else f"{k.detect_ms:.4f}"
        row = f"{tile_label(k.micro_tile):>10} {k.form:<8} {knobs:<22} {line:<28}"
        lines.append(f"{row} {detect:>9} {k.tuning_s:>8.1f}  {k.key}")
    dense = "-" if report.dense_ms is None else f"{report.dense_ms:.4f} ms"
    lines.append(f"dense torch.matmul: {dense}; database {report.database}; {report.elapsed_s:.1f} s")
    return "\n".join(lines)
