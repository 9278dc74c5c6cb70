"""Run-time selection: predict each candidate micro-tile's time from the database, pick the least.

A PIT kernel's time is a line in the micro-tiles it lists, ``ms = a + b * listed``, fitted by
least squares over the sparsities the tuner measured, per kernel (form, micro-tile, dtype,
shape bucket, best knobs). ``a`` holds what every call pays (launch, zero fill, scatter), ``b``
the cost of one listed micro-tile. ``listed`` is scaled to the bucket's free extent (N for a
sparse A, M for a sparse B), so every shape of a bucket reads one line. A candidate's
prediction adds the detection its kernel will run. Its listed micro-tiles are counted by
PIT's detection kernel at its granularity, on the operand's device, which is how a fine
pattern is re-covered by a coarser micro-tile. The dense fallback is the measured
``torch.matmul`` time; whichever predicts least runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pit_compiler.ir import SparsityAttr, plan_pit
from pit_compiler.codegen import kernel_order
from pit_compiler.runtime import RecentCounts, kept, next_turn
from pit_compiler.ops import detect_grid_pieces, is_transposed_view, matmul_contraction, tensor_core_kernel, tvm_dtype
from pit_compiler.schedules import template_for
from pit_compiler.codegen.warpgroup import warpgroup_knobs
from pit_compiler.schedules.tensor_core_matmul import TensorCoreMatmul
from pit_compiler.schedules.warpgroup_matmul import WarpgroupMatmul
from pit_compiler.targets import target_for
from pit_compiler.validation import check_matmul_operands, normalize_micro_tile

from .database import (
    TileDatabase,
    dense_workload,
    matmul_workload,
    shape_bucket,
    target_label,
    tile_database,
    versions,
    workload_key,
)

log = logging.getLogger(__name__)

# What micro_tile="auto" runs when the database knows nothing of the shape: 32-row column
# pieces, the granularity a ReLU leaves over a block of tokens (and sparse_matmul's default).
DEFAULT_MICRO_TILE = (32, 1)
# Run-time lookups (every call) check the database file at most this often: a database written
# by another process (``pit-tune``) is used from the next call this long after.
RECHECK_S = 0.1


@dataclass(frozen=True)
class Line:
    """``ms = a + b * x``, never negative."""

    a: float
    b: float
    points: int

    def __call__(self, x: float) -> float:
        return max(0.0, self.a + self.b * x)


def fit_line(xs, ys) -> Line:
    """Least squares; through the origin when the free fit's intercept comes out negative."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) == 0:
        raise ValueError("fit_line needs at least one point")
    if len(set(x.tolist())) >= 2:
        b, a = np.polyfit(x, y, 1)
        if a >= 0 and b >= 0:
            return Line(float(a), float(b), len(x))
    if not (x > 0).any():
        return Line(float(y.mean()), 0.0, len(x))
    b = float((x * y).sum() / (x * x).sum())
    return Line(0.0, max(b, 0.0), len(x))


def free_extent(sparse: str, shape) -> int:
    """The extent one listed micro-tile's work scales with: N for sparse A, M for sparse B."""
    M, N, _ = shape
    return N if sparse == "A" else M


def operand_elements(sparse: str, shape) -> int:
    M, N, K = shape
    return M * K if sparse == "A" else K * N


def _ok(measurements: dict) -> list[dict]:
    return [m for m in measurements.values() if "ms" in m and "knobs" in m]


def best_knobs(entry: dict) -> dict | None:
    """The knob setting fastest over the points every setting measured (geometric mean)."""
    by_knobs: dict[str, dict] = {}
    for m in _ok(entry["measurements"]):
        text = repr(sorted(m["knobs"].items()))
        by_knobs.setdefault(text, {"knobs": m["knobs"], "points": {}})["points"][
            (tuple(m["shape"]), m["sparsity"])
        ] = max(m["ms"], 1e-9)
    if not by_knobs:
        return None
    common = set.intersection(*(set(v["points"]) for v in by_knobs.values()))

    def score(v):
        points = common or set(v["points"])
        mean_log = sum(math.log(v["points"][p]) for p in points) / len(points)
        return (0 if common else -len(v["points"]), mean_log)

    return min(by_knobs.values(), key=score)["knobs"]


@dataclass(frozen=True)
class KernelModel:
    """One tuned kernel's predicted time: detection + the fitted line at its best knobs."""

    micro_tile: tuple  # storage order, None where it spans all of k
    form: str
    sparse: str
    knobs: dict
    line: Line
    bucket_free: int
    detect_ms_per_element: float

    def predict(self, listed: int, shape, batch: int = 1) -> float:
        x = listed * free_extent(self.sparse, shape) / self.bucket_free
        detect = self.detect_ms_per_element * operand_elements(self.sparse, shape) * batch
        return detect + self.line(x)


def kernel_model(entry: dict) -> KernelModel | None:
    """The model of a kernel entry, or None if it holds no successful measurement."""
    knobs = best_knobs(entry)
    if knobs is None:
        return None
    workload = entry["workload"]
    sparse = workload["sparse"]
    bucket = workload["bucket"]
    points = [m for m in _ok(entry["measurements"]) if m["knobs"] == knobs]
    bucket_free = free_extent(sparse, bucket)
    xs = [m["listed"] * free_extent(sparse, m["shape"]) / bucket_free for m in points]
    line = fit_line(xs, [m["ms"] for m in points])
    detects = [
        d["ms"] / operand_elements(sparse, d["shape"]) for d in entry.get("detect", {}).values() if "ms" in d
    ]
    form = workload["signature"].split("form=")[1].split()[0]
    detect = float(np.mean(detects)) if detects else 0.0
    return KernelModel(tuple(workload["micro_tile"]), form, sparse, knobs, line, bucket_free, detect)


def dense_ms(entry: dict | None, shape, batch: int = 1) -> float | None:
    """The measured torch.matmul time, scaled to ``shape`` by its multiply-adds."""
    if entry is None:
        return None
    per_mac = [m["ms"] / math.prod(m["shape"]) for m in entry["measurements"].values() if "ms" in m]
    return float(np.mean(per_mac)) * math.prod(shape) * batch if per_mac else None


_models: dict = {}


def _cached_model(db: TileDatabase, key: str) -> KernelModel | None:
    """``kernel_model`` of an entry, fitted once per version of the database file."""
    def fitted():
        entry = db.get(key)
        return kernel_model(entry) if entry is not None else None

    return kept(_models, (db.serial, db.token(), key), fitted)


@dataclass(frozen=True)
class CandidateCount:
    """One candidate's detected micro-tiles: ``listed`` (a 0-d tensor on the operand's device)
    now, the boolean grid only when asked (only the chosen candidate's is)."""

    index: object  # MicroTileIndex of the operand as stored
    transposed: bool
    batched: bool

    @property
    def listed(self) -> torch.Tensor:
        return self.index.counts.sum()

    def grid(self) -> torch.Tensor:
        grid = self.index.to_mask()
        grid = grid.transpose(-1, -2) if self.transposed else grid
        return grid if self.batched else grid[0]


def count_candidate(operand: torch.Tensor, tile) -> CandidateCount:
    """Which ``tile = (rows, cols)`` pieces of ``operand`` hold a non-zero (NaN counts).

    PIT's own detection kernel, one pass over the operand as stored (a transposed view is
    read in place, its tile transposed): far cheaper on a GPU than pooling a ``!= 0`` mask.
    """
    transposed = is_transposed_view(operand)
    stored, stored_tile = (operand.transpose(-1, -2), tuple(tile[::-1])) if transposed else (operand, tuple(tile))
    return CandidateCount(detect_grid_pieces(stored, stored_tile), transposed, operand.dim() == 3)


def tile_label(micro_tile) -> str:
    return "x".join("all" if t is None else str(t) for t in micro_tile)


@dataclass(frozen=True)
class Selection:
    """What ``micro_tile="auto"`` runs: a micro-tile, or ``None`` for dense ``torch.matmul``.

    ``predicted_ms`` and ``listed`` are keyed by candidate label (``"32x1"``, ``"dense"``);
    ``source`` is ``"database"``, or ``"default"`` when nothing was tuned for this shape;
    ``count`` holds the chosen candidate's detection.
    """

    micro_tile: tuple | None
    predicted_ms: dict
    listed: dict
    source: str
    count: CandidateCount | None = field(default=None, repr=False, compare=False)

    @property
    def grid(self) -> torch.Tensor | None:
        """The chosen micro-tile's boolean grid of listed pieces (None for dense or default)."""
        return self.count.grid() if self.count is not None else None

    @property
    def dense(self) -> bool:
        return self.micro_tile is None

    @property
    def label(self) -> str:
        return "dense" if self.micro_tile is None else tile_label(self.micro_tile)


_defaulted: set = set()


def kernel_template(plan, shape, dtype: str, target):
    """The template whose knobs the kernel computing the 2-D ``plan`` takes (``shape`` is
    ``(M, N, K)``): the warpgroup or tensor-core tile where run time sends ``plan`` to one
    (``ops.tensor_core_kernel``), else the target's template. Tuner and selection key by it."""
    M, N, K = shape
    if warpgroup_knobs(plan, 2, K, N, dtype, dtype, dtype, target) is not None:
        return WarpgroupMatmul()
    if tensor_core_kernel(plan, 2, K, N, dtype, dtype, dtype, target) is not None:
        return TensorCoreMatmul()
    return template_for(target)


def _candidate_models(db: TileDatabase, sparse: str, shape, dtype: str, target, layout, candidates):
    """``{label: (micro_tile as given, concrete tile, KernelModel)}`` of the tuned candidates,
    and the database entry of the dense fallback (or None). Reading keys and fitting lines
    costs far more than a small matmul: :func:`_weigh` keeps the answer."""
    M, N, K = shape
    contraction = matmul_contraction(2, *layout)
    transposed = layout[0] if sparse == "A" else layout[1]
    operand_shape = (M, K) if sparse == "A" else (K, N)
    if candidates is None:
        fields = {"op": "pit_matmul", "operator": f"{contraction.c} += {contraction.a} * {contraction.b}"}
        fields.update(sparse=sparse, bucket=list(shape_bucket(shape)), dtype=dtype, target=str(target), **versions())
        found = {tuple(e["workload"]["micro_tile"]) for _, e in db.find(**fields)}
        candidates = sorted((t[::-1] if transposed else t for t in found), key=lambda t: [x or 0 for x in t])
    models = {}
    for candidate in candidates:
        tile = normalize_micro_tile(candidate, operand_shape)
        plan = plan_pit(contraction, SparsityAttr(sparse, tile[::-1] if transposed else tile), {"m": M, "n": N, "k": K})
        template = kernel_template(plan, shape, dtype, target)
        model = _cached_model(db, workload_key(matmul_workload(plan, shape, dtype, target, template)))
        if model is not None:
            models[tile_label(candidate)] = (tuple(candidate), tile, model)
    dense = db.get(workload_key(dense_workload(shape, dtype, target)))
    return models, dense


@dataclass(frozen=True)
class _Weighed:
    """What selection weighs for calls of one shape: the tuned candidates, the dense time."""

    shape: tuple  # (M, N, K)
    batch: int
    models: dict  # label -> (micro_tile as given, concrete tile, KernelModel)
    dense_ms: float | None
    bounds: dict  # label -> least possible time: its detection and its line at nothing listed
    key: tuple  # what calls that share counts have in common


@dataclass(frozen=True)
class _Call:
    """One call's operand and what is weighed for its shape."""

    operand: torch.Tensor
    weighed: _Weighed

    def predict(self, label: str, listed: int) -> float:
        return self.weighed.models[label][2].predict(listed, self.weighed.shape, self.weighed.batch)

    def count(self, label: str) -> CandidateCount:
        return count_candidate(self.operand, self.weighed.models[label][1])

    def selection(self, choice: str, predicted: dict, listed: dict, found: dict) -> Selection:
        if choice == "dense":
            return Selection(None, predicted, listed, "database")
        micro_tile = self.weighed.models[choice][0]  # as given: (1, None) stays
        return Selection(micro_tile, predicted, listed, "database", found[choice])


_weighed_cache: dict = {}


def _weigh(A, B, sparse, candidates, database) -> _Call | Selection:
    """The candidates of this call, or the default :class:`Selection` where none is tuned.
    Kept per shape, layout and version of the database: ``micro_tile="auto"`` asks on every call."""
    check_matmul_operands(A, B)
    if sparse not in ("A", "B"):
        raise ValueError(f"sparse must be 'A' or 'B' to select a micro-tile, got {sparse!r}")
    db = database if database is not None else tile_database()
    operand = A if sparse == "A" else B
    layout = (is_transposed_view(A), is_transposed_view(B))
    candidates = None if candidates is None else tuple(tuple(c) for c in candidates)
    shapes = (tuple(A.shape), tuple(B.shape), A.dtype, str(A.device), layout)
    cache_key = (db.serial, db.token(RECHECK_S), sparse, *shapes, candidates)
    weighed = kept(_weighed_cache, cache_key, lambda: _weigh_shape(db, A, B, sparse, layout, candidates, cache_key))
    return weighed if isinstance(weighed, Selection) else _Call(operand, weighed)


def _weigh_shape(db, A, B, sparse, layout, candidates, key) -> _Weighed | Selection:
    M, K, N = A.shape[-2], A.shape[-1], B.shape[-1]
    shape, batch = (M, N, K), (A.shape[0] if A.dim() == 3 else 1)
    target, dtype = target_for(A.device), tvm_dtype(A.dtype, "A")
    models, dense_entry = _candidate_models(db, sparse, shape, dtype, target, layout, candidates)
    if not models:
        logged = (str(db.path), sparse, shape_bucket(shape), dtype, str(target))
        if logged not in _defaulted:
            _defaulted.add(logged)
            log.debug(
                "no tuned PIT kernels for sparse %s, %s %s on %s in %s; micro_tile='auto' uses %s. "
                "Tune with: pit-tune matmul --shape %dx%dx%d --dtype %s --sparse %s",
                sparse, "x".join(map(str, shape)), dtype, target_label(target), db.path, DEFAULT_MICRO_TILE,
                M, N, K, dtype, sparse,
            )  # fmt: skip
        return Selection(DEFAULT_MICRO_TILE, {}, {}, "default")
    bounds = {label: model.predict(0, shape, batch) for label, (_, _, model) in models.items()}
    return _Weighed(shape, batch, models, dense_ms(dense_entry, shape, batch), bounds, key)


def select_micro_tile(
    A: torch.Tensor,
    B: torch.Tensor,
    sparse: str = "A",
    candidates=None,
    *,
    dense: bool = True,
    prune: bool = False,
    database: TileDatabase | None = None,
) -> Selection:
    """Choose the micro-tile of ``sparse`` (``"A"`` or ``"B"``) that should finish first.

    Args:
        candidates: micro-tiles to weigh, e.g. ``[(32, 1), (1, 32), (32, 32)]``; by default every
            micro-tile tuned for this shape bucket, dtype and target. Untuned ones are skipped.
        dense: also weigh dense ``torch.matmul`` (when the database measured it).
        prune: detect only candidates that can still win: a candidate's time is at least its
            detection plus its line at zero listed micro-tiles, so one whose bound is no less
            than the best prediction so far is skipped, undetected and absent from
            ``predicted_ms`` (where dense is sure to win it runs no detection at all). Without
            it every candidate is detected and predicted.
        database: defaults to the process-wide one (``<cache dir>/tiles.json``).

    With nothing tuned it returns ``DEFAULT_MICRO_TILE`` with ``source="default"`` (logged once
    at DEBUG). Detection runs once per candidate, on the operands' device, and its counts are
    read back at once (``micro_tile="auto"`` uses :func:`select_without_waiting` instead).
    """
    call = _weigh(A, B, sparse, candidates, database)
    if isinstance(call, Selection):
        return call
    selection, _ = _select_now(call, dense, prune)
    return selection


def _select_now(call: _Call, dense: bool, prune: bool) -> tuple[Selection, dict]:
    """:func:`select_micro_tile` on this call's own counts; also returns what it detected."""
    # Step 1. The dense fallback's measured time, and each candidate's lower bound (nothing listed).
    predicted, listed, found = {}, {}, {}
    dense_time = call.weighed.dense_ms if dense else None
    if dense_time is not None:
        predicted["dense"] = dense_time
    bounds = call.weighed.bounds
    # Step 2. Count each candidate's listed micro-tiles (detection, NaN != 0 counts), most
    # promising first, and predict its time.
    if not prune:  # one host read for all candidates
        found = {label: call.count(label) for label in call.weighed.models}
        counts = torch.stack([count.listed for count in found.values()]).tolist()
        listed = dict(zip(found, (int(c) for c in counts)))
    for label in sorted(call.weighed.models, key=bounds.get):
        if prune:
            if predicted and bounds[label] >= min(predicted.values()):
                break  # the rest are bounded higher still
            found[label] = call.count(label)
            listed[label] = int(found[label].listed)
        predicted[label] = call.predict(label, listed[label])
    return call.selection(min(predicted, key=predicted.get), predicted, listed, found), found


_recent = RecentCounts()  # micro_tile="auto"'s counts per call and candidate
_probe_turn: dict = {}


def select_without_waiting(A: torch.Tensor, B: torch.Tensor, sparse: str = "A") -> Selection:
    """``micro_tile="auto"``'s choice, made without waiting for the GPU.

    Counting every candidate and reading the counts back cost more than the choice saves
    (0.13-0.37 ms per call on an H200 at 8192^3). So the first call of a shape counts every
    candidate at once (as :func:`select_micro_tile`); later calls predict from the newest
    counts of earlier calls that have reached the host
    (:mod:`~pit_compiler.runtime.recent_counts`), and detect only the chosen micro-tile (which
    the kernel then reads: the product stays exact) and, in turn, one other candidate that
    could still win, so that every count keeps following the data. ``listed`` then holds
    those earlier counts.
    """
    call = _weigh(A, B, sparse, None, None)
    if isinstance(call, Selection):
        return call
    weighed = call.weighed
    earlier = {label: _recent.latest((weighed.key, label)) for label in weighed.models}
    if None in earlier.values():
        selection, found = _select_now(call, dense=True, prune=False)
    else:
        predicted = {label: call.predict(label, listed) for label, listed in earlier.items()}
        if weighed.dense_ms is not None:
            predicted["dense"] = weighed.dense_ms
        choice = min(predicted, key=predicted.get)
        detect = [] if choice == "dense" else [choice]
        rival = _rival_to_probe(weighed, predicted, choice)
        if rival is not None:
            detect.append(rival)
        found = {label: call.count(label) for label in detect}
        selection = call.selection(choice, predicted, earlier, found)
    for label, count in found.items():
        _recent.post((weighed.key, label), count.index.counts)
    return selection


CLOSE = 1.25  # a rival predicted within this factor of the choice is probed every call
FAR_PROBE_EVERY = 8  # the others, one call in this many


def _rival_to_probe(weighed: _Weighed, predicted: dict, choice: str) -> str | None:
    """The candidate other than ``choice`` whose count this call refreshes, in turn, or None.

    Only candidates whose bound (detection plus nothing listed) beats the choice can win.
    Those predicted close to it are probed every call (one at a time); where all of them are
    predicted far slower, one call in :data:`FAR_PROBE_EVERY` probes one: at 8192^3 on an H200 a
    detection on every call cost 0.06 ms, and a pattern that changes that much is followed a few
    calls late instead (exact all along).
    """
    rivals = [name for name in sorted(weighed.models) if name != choice and weighed.bounds[name] < predicted[choice]]
    if not rivals:
        return None
    turn = next_turn(_probe_turn, weighed.key)
    close = [name for name in rivals if predicted[name] < CLOSE * predicted[choice]]
    if close:
        return close[turn % len(close)]
    if turn % FAR_PROBE_EVERY:
        return None
    return rivals[turn // FAR_PROBE_EVERY % len(rivals)]


def unbatched_plan(plan, sizes: dict):
    """The 2-D plan a batched kernel was tuned as (one kernel serves both)."""
    c = plan.contraction
    if "batch" not in c.order("c"):
        return plan
    a_transposed = tuple(r for r in c.order("a") if r != "batch") == ("k", "m")
    b_transposed = tuple(r for r in c.order("b") if r != "batch") == ("n", "k")
    roles = [r for r in c.order(plan.sparse) if r != "batch"]
    tile = tuple(int(plan.tile[r]) for r in roles)
    flat = matmul_contraction(2, a_transposed, b_transposed)
    return plan_pit(flat, SparsityAttr(plan.sparse.upper(), tile), sizes, plan.form)


_knob_cache: dict = {}
_knob_warned: set = set()


def _stored_knobs(db: TileDatabase, plan, dtype: str, target, A: torch.Tensor, B: torch.Tensor, template):
    """The best knobs ``db`` holds for this product's kernel of ``template``, or None."""
    sizes = dict(zip(kernel_order(plan, "a"), _batched_shape(A)))
    sizes |= dict(zip(kernel_order(plan, "b"), _batched_shape(B)))
    shape = (sizes["m"], sizes["n"], sizes["k"])
    flat = unbatched_plan(plan, {"m": shape[0], "n": shape[1], "k": shape[2]})
    entry = db.get(workload_key(matmul_workload(flat, shape, dtype, target, template)))
    knobs = best_knobs(entry) if entry is not None else None
    return template.Knobs(**knobs) if knobs is not None else None


def _batched_shape(t: torch.Tensor) -> tuple:
    """``t``'s shape with a leading batch of 1 where it has none (no view: cheaper per call)."""
    return tuple(t.shape) if t.dim() == 3 else (1, *t.shape)


def tuned_knobs(
    plan, dtype: str, target, A: torch.Tensor, B: torch.Tensor, database: TileDatabase | None = None, template=None
):
    """The database's best knobs for the kernel about to run, else None.

    ``A`` and ``B`` are the kernel's storage-order operands (2-D or batched); ``template`` is the one
    whose knobs it takes (default: the target's, which ``run_matmul``'s kernel takes). Never
    raises: a lookup that fails costs the defaults, with one warning.
    """
    if plan.sparse == "c":
        return None
    db = database if database is not None else tile_database()
    try:
        token = db.token(RECHECK_S)
        if token is None:
            return None
        template = template if template is not None else template_for(target)
        # Targets compare by identity (run time reuses one per device): no printing per call.
        # Keyed by the operands' shapes, which cost nothing to read, rather than their bucket.
        cache_key = (db.serial, token, plan.signature(), A.shape, B.shape, dtype, target, template.name)
        return kept(_knob_cache, cache_key, lambda: _stored_knobs(db, plan, dtype, target, A, B, template))
    except Exception as error:  # the defaults are always correct, only slower
        if str(db.path) not in _knob_warned:
            _knob_warned.add(str(db.path))
            log.warning("could not read tuned knobs from %s (%s); using the defaults", db.path, error)
        return None
