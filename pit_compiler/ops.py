"""Running PIT kernels on torch tensors: detection, the index, the matmul forms, the cache.

No argument checks here: the public functions in :mod:`pit_compiler.api` validate first.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import NamedTuple

import torch

from pit_compiler.codegen import detect_kernel, kernel_order, matmul_kernel
from pit_compiler.codegen.gather_matmul import fits_tensor_cores, row_gather_kernels
from pit_compiler.codegen.reduce_matmul import ROW_BLOCKS, fitting_knobs, reduce_tile_kernel, reduce_tile_knobs
from pit_compiler.codegen.warpgroup import (
    fitting_warpgroup_knobs,
    pack_kernel,
    packed_columns,
    reads_b_k_major,
    row_gather_knobs,
    warpgroup_form,
    warpgroup_kernel,
    warpgroup_knobs,
)
from pit_compiler.schedules import warpgroup_strips
from pit_compiler.schedules.tensor_core_matmul import TensorCoreMatmul
from pit_compiler.schedules.warpgroup_matmul import WarpgroupMatmul
from pit_compiler.ir import Contraction, PITPlan, SparsityAttr, as_contraction, plan_pit
from pit_compiler.runtime import CompactCopies, KernelCache, MicroTileIndex, RecentCounts, default_cache_dir, kept, next_turn
from pit_compiler.targets import mma_sync_dtypes, target_for
from pit_compiler.validation import MAX_ELEMENTS

# The logical axes of each operand's rows and columns, whatever its storage order.
_LOGICAL_ROLES = {"a": ("m", "k"), "b": ("k", "n"), "c": ("m", "n")}
_TVM_DTYPE = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float64: "float64",
}

_cache: KernelCache | None = None


def kernel_cache() -> KernelCache:
    """The process-wide kernel cache (on disk under :func:`default_cache_dir`)."""
    global _cache
    if _cache is None:
        _cache = KernelCache(default_cache_dir())
    return _cache


def set_kernel_cache(cache: KernelCache | None) -> None:
    """Replace the process-wide cache (``None``: a fresh one at the default place on next use)."""
    global _cache
    _cache = cache


@functools.lru_cache(maxsize=None)
def matmul_contraction(ndim: int, a_transposed: bool = False, b_transposed: bool = False) -> Contraction:
    """``C = A @ B`` with A and B stored as written or transposed: kernels read either layout."""
    batch = "b, " if ndim == 3 else ""
    a = "k, m" if a_transposed else "m, k"
    b = "n, k" if b_transposed else "k, n"
    return as_contraction(f"C[{batch}m, n] += A[{batch}{a}] * B[{batch}{b}]")


def storage(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A compact tensor holding ``t``, and whether it is ``t`` transposed (a free view).

    Transposed views (``W.t()`` of an ``nn.Linear`` weight, the operands of a backward pass)
    are read in place by a kernel built for that layout instead of being copied.
    """
    if is_transposed_view(t):
        return t.transpose(-1, -2), True
    return t.contiguous(), False


def is_transposed_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a transposed view of compact memory, which kernels read in place."""
    return not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()


def tvm_dtype(dtype: torch.dtype, argument: str) -> str:
    if dtype not in _TVM_DTYPE:
        raise TypeError(f"{argument} has dtype {dtype}; PIT kernels read {list(_TVM_DTYPE)}")
    return _TVM_DTYPE[dtype]


def batched(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Kernels read compact memory; bool is read as bytes (a free view)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def detect(
    s: torch.Tensor,
    order: tuple[str, ...],
    blocked: str,
    permuted: str,
    tiles: dict,
    whole_blocked: bool,
    argument: str,
) -> MicroTileIndex:
    """Run the detection kernel over ``s`` (3-D, stored in ``order``)."""
    return detect_as(s, DetectionArgs(order, blocked, permuted, tuple(tiles.items()), whole_blocked, argument))


class DetectionArgs(NamedTuple):
    """What :func:`detect` reads of a micro-tile index besides the operand (hashable: a route keeps it)."""

    order: tuple  # the operand's storage order, batch first
    blocked: str
    permuted: str
    tiles: tuple  # (role, extent) pairs of the micro-tile
    whole_blocked: bool  # one list for the whole blocked axis
    argument: str  # the argument named in errors


def detect_as(s: torch.Tensor, args: DetectionArgs) -> MicroTileIndex:
    """:func:`detect` with its arguments in one tuple, as :class:`Route` keeps them."""
    cache = kernel_cache()
    key = (s.shape, s.dtype, s.device, s.storage_offset() % 8, args, cache)
    shape, kernel, words = kept(_DETECTIONS, key, lambda: _detection(s, args, cache))
    counts = torch.empty(shape[:2], dtype=torch.int32, device=s.device)
    indices = torch.empty(shape, dtype=torch.int32, device=s.device)
    if kernel is None:  # nothing to read
        counts.zero_()
    else:
        kernel(s.view(words), counts, indices)
    return MicroTileIndex(counts, indices)


# Per operand shape, dtype, device and alignment, and micro-tile: the index's shape, the kernel
# and the words it reads. Every call detects, and working these out took ~20 us of host time.
# Keyed by device, not target: replacing a device's target needs clear_call_caches().
_DETECTIONS: dict = {}


def index_shape(shape: tuple, args: DetectionArgs) -> tuple[int, int, int]:
    """``(batch, blocks, chunks)`` of the index :func:`detect_as` makes of an operand of ``shape`` (3-D)."""
    extent, tiles = dict(zip(args.order, shape)), dict(args.tiles)
    blocks = 1 if args.whole_blocked else math.ceil(extent[args.blocked] / tiles[args.blocked])
    return extent["batch"], blocks, math.ceil(extent[args.permuted] / tiles[args.permuted])


def _detection(s, args: DetectionArgs, cache) -> tuple:
    """:func:`detect`'s ``((batch, blocks, chunks), kernel, word dtype)``; kernel None for an empty ``s``."""
    order, blocked, permuted, tiles, whole_blocked, argument = args
    tiles = dict(tiles)
    shape = index_shape(s.shape, args)
    if s.numel() == 0:
        return shape, None, s.dtype
    dtype = tvm_dtype(s.dtype, argument)
    tile = {blocked: None if whole_blocked else tiles[blocked], permuted: tiles[permuted]}
    last = order[-1]  # the contiguous axis
    words, pack = as_words(s, 1 if last == "batch" else tile[last] or s.shape[-1])
    if pack > 1:
        tile = {role: t // pack if role == last and t is not None else t for role, t in tile.items()}
    one_pass = s.is_cuda  # CUDA lists with atomics, in one pass
    kernel = detect_kernel(
        order, blocked, permuted, tile[blocked], tile[permuted], dtype, target_for(s.device), cache, pack=pack,
        one_pass=one_pass,
    )  # fmt: skip
    return shape, kernel, words.dtype


_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def detect_grid_pieces(x: torch.Tensor, tile: tuple[int, int], blocked: str = "rows") -> MicroTileIndex:
    """The non-empty ``tile = (rows, cols)`` pieces of a 2-D or batched 3-D ``x`` (a concrete
    tile: see ``validation.normalize_micro_tile``), per block of rows (``blocked="rows"``) or
    of columns. One pass of the detection kernel on ``x``'s device."""
    permuted = "cols" if blocked == "rows" else "rows"
    tiles = dict(zip(("rows", "cols"), tile))
    return detect(as_kernel_input(batched(x)), ("batch", "rows", "cols"), blocked, permuted, tiles, False, "x")


def as_words(s: torch.Tensor, run: int) -> tuple[torch.Tensor, int]:
    """``s`` (compact) viewed as integer words of ``pack`` elements along its last axis, and ``pack``.

    Detection reads bits, so packing is a free view that lets one load test up to 8 bytes. A
    word must not straddle two micro-tiles: ``pack`` divides ``run``, the micro-tile's extent
    along the last axis, and that axis' extent.
    """
    size, extent = s.element_size(), s.shape[-1]
    pack = 8 // size if size < 8 else 1
    while pack > 1 and (run % pack or extent % pack or s.storage_offset() % pack):
        pack //= 2
    return s.view(_WORDS[size * pack]), pack


def reads_row_blocks(plan: PITPlan) -> bool:
    """Whether ``plan``'s kernel reads the index :func:`detect_grid_pieces` makes of the sparse
    operand's storage: lists per block of stored rows, over chunks of stored columns."""
    roles = tuple(r for r in kernel_order(plan, plan.sparse) if r != "batch")
    whole_blocked = plan.form == "scatter" and not plan.accumulate
    return roles == (plan.blocked, plan.permuted) and not whole_blocked


def index_for(plan: PITPlan, operand, mask, tile, grid, args: DetectionArgs | None = None) -> MicroTileIndex:
    """Detect the listed micro-tiles from the mask (if given) or from the operand itself.
    ``args``: :func:`detection_args` of the call, where known (a :class:`Route` keeps them)."""
    if args is None:
        by_grid = mask is not None and tuple(mask.shape[-2:]) == grid
        args = detection_args(plan, tile, by_grid, "mask" if mask is not None else plan.sparse.upper())
    return detect_as(as_kernel_input(batched(operand if mask is None else mask)), args)


def detection_args(plan: PITPlan, tile, by_grid: bool, argument: str) -> DetectionArgs:
    """How :func:`index_for` detects ``plan``'s index: from a mask of the micro-tile grid
    (``by_grid``) or from the sparse operand (or a mask its size), in micro-tiles ``tile``."""
    order = kernel_order(plan, plan.sparse)
    roles = tuple(r for r in order if r != "batch")
    tiles = tuple(zip(roles, (1, 1) if by_grid else tile))
    whole_blocked = plan.form == "scatter" and not plan.accumulate
    return DetectionArgs(order, plan.blocked, plan.permuted, tiles, whole_blocked, argument)


def result_dtype(plan: PITPlan, out_dtype: torch.dtype) -> torch.dtype:
    """What the kernel writes for an ``out_dtype`` output: partial sums of several k blocks meet
    in one output element when ``plan`` accumulates, so they are added in float32."""
    return torch.float32 if plan.accumulate else out_dtype


def run_matmul(plan: PITPlan, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor, index: MicroTileIndex) -> None:
    target = target_for(A.device)
    dtype = tvm_dtype(A.dtype, "A")
    widen = result_dtype(plan, out.dtype) != out.dtype
    result = torch.empty(out.shape, dtype=torch.float32, device=out.device) if widen else out
    # Knobs: the tile database's best for this kernel (pit-tune), else the template's defaults.
    from pit_compiler.tuning.cost_model import tuned_knobs

    knobs = tuned_knobs(plan, dtype, target, A, B)
    kernel = matmul_kernel(plan, dtype, tvm_dtype(result.dtype, "out"), target, kernel_cache(), knobs)
    kernel(A, B, result, index.counts, index.indices)
    if widen:
        out.copy_(result)


class Computed(NamedTuple):
    """What :func:`pit_matmul` ran: its plan and index, and whether it computed ``C^T``
    (a sparse B as the sparse A of ``B^T @ A^T``), whose index lists ``B^T``'s micro-tiles."""

    plan: PITPlan
    index: MicroTileIndex
    transposed: bool = False


def operand_grid(plan: PITPlan, index: MicroTileIndex, transposed: bool = False) -> torch.Tensor:
    """The listed micro-tiles as a ``(batch, rows, cols)`` grid of the logical sparse operand."""
    grid = index.to_mask()
    flip = (plan.blocked != _LOGICAL_ROLES[plan.sparse][0]) != transposed
    return grid.transpose(-1, -2) if flip else grid


# Transposed B (an nn.Linear weight's W.t()) copied to the layout the warpgroup tile reads (where
# it does not read W in place: see codegen.warpgroup.READS_B_AS_STORED), one copy per weight
# while it is unchanged: at most this many bytes of copies are kept.
COMPACT_COPIES = CompactCopies(limit_bytes=4 << 30)


def compact_b_reaches_tensor_cores(facts: tuple, a_transposed: bool, tile, sizes: dict, form=None) -> bool:
    """Whether a tensor-core tile reads B stored ``(k, n)`` where none reads it as stored,
    transposed: then B is read from its compact copy (:data:`COMPACT_COPIES`; the tuner tunes
    that kernel). On Hopper an ``nn.Linear`` weight otherwise takes the one-thread-per-output
    kernel, so its product falls back to cuBLAS nearly always. ``facts``: :func:`_call_facts`
    of the call (B logical), ``tile`` A's micro-tile in its storage order."""

    def kernel(b_transposed: bool):
        contraction = matmul_contraction(facts[0], a_transposed, b_transposed)
        return tensor_core_kernel(plan_pit(contraction, SparsityAttr("A", tile), sizes, form), *facts)

    return kernel(True) is None and kernel(False) is not None


def _sparse_b_reaches_tensor_cores_as_a(A, B, out, tile) -> bool:
    """Whether ``C = A @ B`` with B sparse has no tensor-core kernel (none takes a sparse B)
    but ``C^T = B^T @ A^T`` with ``B^T`` the sparse A has one: a pruned ``nn.Linear`` weight W
    (B is ``W.t()``) is then read in place, as a sparse A stored ``(n, k)``."""
    transposed = _transposed_product(A, B, out, tile)
    return transposed is not None and tensor_core_path(*transposed) is not None


def _transposed_product(A, B, out, tile):
    """``(plan, B^T, A^T, C^T)`` of :func:`_sparse_b_reaches_tensor_cores_as_a`'s product, with
    A^T and C^T as stand-ins of their compact shapes (nothing is allocated); None where B is
    not a transposed view of a 2-D weight."""
    if A.dim() != 2 or not is_transposed_view(B):
        return None
    b_t = A.new_empty(()).expand(A.shape[-1], A.shape[-2])  # A^T as it will be copied: compact (k, m)
    out_t = out.new_empty(()).expand(out.shape[-1], out.shape[-2])
    sizes = {"m": B.shape[-1], "k": A.shape[-1], "n": A.shape[-2]}
    plan = plan_pit(matmul_contraction(2), SparsityAttr("A", tuple(tile[::-1])), sizes, None)
    return plan, B.transpose(-1, -2), b_t, out_t


def pruned_weight_beats_dense(x2: torch.Tensor, weight: torch.Tensor, tile, listed: float) -> bool:
    """Whether ``x2 @ weight.t()`` with ``listed`` of the weight's micro-tiles ``tile`` (over
    ``(out, in)``) listed is predicted to finish first on PIT: on a tensor-core tile (as the
    transposed product) and below its :func:`dense_crossover`. Else an ``nn.Linear`` with a
    pruned weight runs dense cuBLAS, exact as the weight's own zeros are computed. Asked on every
    call of such a layer, from shapes and ``listed`` only: kept per call signature."""
    key = (x2.shape, x2.dtype, x2.device, weight.shape, weight.stride(), weight.dtype, tuple(tile), listed)
    return kept(_PRUNED_CHOICES, key, lambda: _pruned_weight_beats_dense(x2, weight, tile, listed))


_PRUNED_CHOICES: dict = {}  # pruned_weight_beats_dense's answers per call signature


def _pruned_weight_beats_dense(x2: torch.Tensor, weight: torch.Tensor, tile, listed: float) -> bool:
    out = x2.new_empty(()).expand(x2.shape[0], weight.shape[0])
    transposed = _transposed_product(x2, weight.t(), out, tuple(tile[::-1]))
    if transposed is None or tensor_core_path(*transposed) is None:
        return False
    return listed <= dense_crossover(*transposed)


def pit_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor,
    sparse: str,
    tile: tuple[int, int],
    grid_shape: tuple[int, int],
    mask: torch.Tensor | None,
    form: str | None,
    *,
    cover: bool = False,
    dense_fallback: bool = False,
    keep_index: bool = False,
    detected: MicroTileIndex | None = None,
) -> Computed | None:
    """Write ``A @ B`` (with ``sparse``'s unlisted micro-tiles taken as zero) into ``out``.

    Returns the plan and index it used (:class:`Computed`), or None where there was nothing to
    compute. A sparse B that only the transposed product takes to tensor cores
    (:func:`_sparse_b_reaches_tensor_cores_as_a`) runs as that product. ``cover``
    lets a detected micro-tile that has no tensor-core kernel run as a taller one that has
    (:func:`tensor_core_cover`); the index returned is then the cover's. ``dense_fallback``
    lets a detected operand too dense for PIT to win run as ``torch.matmul`` (:func:`dense_wins`),
    and a product too small for PIT to win at any density run so without detection
    (:func:`below_call_floor`; then None is returned, unless ``keep_index`` asks for the index).
    ``detected``: the sparse operand's pieces as :func:`detect_grid_pieces` lists them on its
    storage (``micro_tile="auto"`` has them), used instead of detecting again where the plan's
    kernel reads that very index. After a signature's first call, the fallback is decided by
    the newest count that reached the host before detecting, and cuBLAS or C's zeroing is
    queued ahead of detection; while that count sends the calls to cuBLAS, only one in
    :data:`DENSE_PROBE_EVERY` detects (the others return None, unless ``keep_index``).
    """
    logical_a, logical_b = A, B
    if out.numel() == 0:
        return None
    if A.shape[-1] == 0:
        out.zero_()
        return None
    if dense_fallback and not keep_index and weighs_dense_kernels(A.device) and below_call_floor(A, B):
        dense_product(A, B, out, sparse, tile, grid_shape, mask)
        return None
    flags = (sparse, tuple(tile), tuple(grid_shape), form, mask is None, cover, detected is None)
    key = (A.shape, A.stride(), B.shape, B.stride(), A.dtype, B.dtype, out.dtype, A.device, *flags)
    route = kept(_ROUTES, key, lambda: _derive_route(A, B, out, *flags))
    if route.transposed_product:
        # C^T = B^T A^T, B^T the sparse A (stored (n, k) when B is W.t()); A^T made compact.
        out_t = torch.empty(out.shape[::-1], dtype=out.dtype, device=out.device)
        mask_t = mask.transpose(-1, -2) if mask is not None else None
        used = pit_matmul(
            B.transpose(-1, -2), A.transpose(-1, -2).contiguous(), out_t, "A", tile[::-1], grid_shape[::-1], mask_t,
            None, cover=cover, dense_fallback=dense_fallback,
        )  # fmt: skip
        out.copy_(out_t.t())
        return used if used is None else Computed(used.plan, used.index, transposed=True)
    A = A.transpose(-1, -2) if route.a_transposed else A.contiguous()
    if route.compact_b:
        B = COMPACT_COPIES.get(logical_b)
    else:
        B = B.transpose(-1, -2) if route.b_transposed else B.contiguous()
    if route.flipped and mask is not None:
        mask = mask.transpose(-1, -2)
    plan = route.plan
    weigh_dense = dense_fallback and mask is None and falls_back_on(A.device)
    # The newest count of this signature that reached the host (no wait) decides before detection
    # runs, so the product, or the zeroing of C that the row gather needs, is queued ahead of it.
    listed = RECENT_COUNTS.latest(route.signature) if weigh_dense else UNREAD
    known = listed is not UNREAD and listed is not None
    dense = known and too_dense(listed, route.crossover, route.slots)
    zeroed = known and not dense and route.zeroes_output and _warpgroup_ready(out)
    if dense:
        torch.matmul(logical_a, logical_b, out=out)  # exact: the unlisted micro-tiles are zero
    elif zeroed:
        out.zero_()
    reuses_detected = detected is not None and mask is None and route.reads_detected
    if dense and not keep_index and not reuses_detected and not probes_while_dense(route.signature):
        return None  # done; a later call refreshes the count that chose cuBLAS
    if reuses_detected:
        index = detected
    else:
        operand = {"A": A, "B": B}.get(sparse)
        index = index_for(plan, operand, mask, route.tile, route.grid_shape, route.detection if mask is None else None)
    if known:
        RECENT_COUNTS.post(route.signature, index.counts)  # for the calls that follow
    if dense:
        return Computed(plan, index)
    if listed is None:  # the signature's first call: decided by its own count (one wait)
        if dense_wins(index, route.crossover, route.signature):
            torch.matmul(logical_a, logical_b, out=out)
            return Computed(plan, index)
        listed = UNREAD  # the tile choice reads that count too
    if not run_on_tensor_cores(plan, A, B, out, index, None, route.facts, listed=listed, zeroed=zeroed):
        run_matmul(plan, batched(A), batched(B), batched(out), index)
    return Computed(plan, index)


UNREAD = object()  # no count was read for this call: the tile choice reads its own

# While the newest count of a signature sends its calls to cuBLAS, one call in this many still
# detects, to refresh that count; the others skip detection's pass over the operand (0.07 ms
# at 8192^3 on an H100, about 5 % of cuBLAS, plus its launch and copy on the host). A pattern
# that turns sparse is then followed up to this many calls late: exact all along.
DENSE_PROBE_EVERY = 8
_DENSE_TURNS: dict = {}  # call signature -> calls sent to cuBLAS by a known count


def probes_while_dense(signature) -> bool:
    """Whether this call, which a known count already sent to cuBLAS, detects all the same (the
    first such call of a signature, then one in :data:`DENSE_PROBE_EVERY`)."""
    return next_turn(_DENSE_TURNS, signature) % DENSE_PROBE_EVERY == 0


class Route(NamedTuple):
    """What a :func:`pit_matmul` call's shapes, layouts and dtypes decide (kept in ``_ROUTES``)."""

    transposed_product: bool  # a sparse B run as the sparse A of C^T = B^T A^T; nothing below applies
    a_transposed: bool  # A, B read as the transposed views they are (else made compact)
    b_transposed: bool
    compact_b: bool  # B read from its compact (k, n) copy (:func:`compact_b_reaches_tensor_cores`)
    flipped: bool  # the sparse operand is stored transposed: its tile, grid and mask are read so
    plan: PITPlan  # covered (:func:`tensor_core_cover`) where the call lets it
    tile: tuple  # the sparse operand's micro-tile and grid, in its storage order
    grid_shape: tuple
    reads_detected: bool  # the kernel reads the index :func:`detect_grid_pieces` makes
    facts: tuple  # :func:`_call_facts` of the kernel's operands
    crossover: float  # :func:`dense_crossover`
    signature: tuple  # :func:`call_signature`
    detection: DetectionArgs | None  # how an unmasked call detects its index (:func:`detection_args`)
    slots: int  # micro-tile slots of that index, which :func:`dense_wins` weighs the listed against
    zeroes_output: bool  # the warpgroup kernel writes ``out`` zeroed first (:func:`zeroes_out_first`)


# Route per call signature (its shapes, strides, dtypes, device and options). Every call asks,
# and deriving one (planning, covers, tensor-core fits, crossovers) cost about 60 us of host
# time per call on an H100 machine, where cuBLAS issues a whole product in 15. The answers read
# only those and the functions of this module that decide them: replacing one of those (as
# tests do) needs clear_call_caches().
_ROUTES: dict = {}


def clear_call_caches() -> None:
    """Forget the routes, detections and pruned-weight choices kept per call signature: after
    replacing a function of this module that decides them (tests do), or the target of a device."""
    _ROUTES.clear()
    _DETECTIONS.clear()
    _PRUNED_CHOICES.clear()
    _DENSE_TURNS.clear()


def _derive_route(A, B, out, sparse, tile, grid_shape, form, unmasked, cover, undetected) -> Route:
    """:class:`Route` of a call, from its operands' shapes, layouts and dtypes (never their values)."""
    if sparse == "B" and form is None and undetected and _sparse_b_reaches_tensor_cores_as_a(A, B, out, tile):
        return Route(True, *(None,) * 14)
    logical_b = B
    M, K, N = A.shape[-2], A.shape[-1], B.shape[-1]
    A, a_transposed = storage(A)
    B, b_transposed = storage(B)
    flipped = {"A": a_transposed, "B": b_transposed, "C": False}[sparse]
    if flipped:
        tile, grid_shape = tile[::-1], grid_shape[::-1]
    sizes = {"m": M, "n": N, "k": K}
    compact_b = (
        b_transposed
        and sparse == "A"
        and compact_b_reaches_tensor_cores(_call_facts(A, logical_b, out), a_transposed, tile, sizes, form)
    )
    if compact_b:  # the copy has logical B's shape and dtype: it stands in for it
        B, b_transposed = logical_b, False
    contraction = matmul_contraction(A.dim(), a_transposed, b_transposed)
    plan = plan_pit(contraction, SparsityAttr(sparse, tuple(tile)), sizes, form)
    covered = tensor_core_cover(plan, A, B, out) if cover and unmasked and form is None else plan
    if covered is not plan:
        plan, tile = covered, (covered.tile["m"], covered.tile["k"])  # A stored (m, k)
    facts = _call_facts(A, B, out)
    detection, slots = None, 0
    if unmasked:
        detection = detection_args(plan, tile, False, plan.sparse.upper())
        operand = {"A": A, "B": B}[sparse]
        slots = math.prod(index_shape((1, *operand.shape) if operand.dim() == 2 else operand.shape, detection))
    zeroes_output = zeroes_out_first(plan, out.dtype) and warpgroup_knobs(plan, *facts) is not None
    return Route(
        False, a_transposed, b_transposed, compact_b, flipped, plan, tuple(tile), tuple(grid_shape),
        reads_row_blocks(plan), facts, dense_crossover(plan, A, B, out), call_signature(plan, A, B),
        detection, slots, zeroes_output,
    )  # fmt: skip


DENSE_FALLBACK = True  # the kernels' own tests turn it off, to check them at every density


def weighs_dense_kernels(device: torch.device) -> bool:
    """Whether choices made from shapes alone (no host read) weigh PyTorch's dense kernels
    against PIT's on ``device``: GPUs, where the crossovers were measured."""
    return DENSE_FALLBACK and device.type == "cuda"


def falls_back_on(device: torch.device) -> bool:
    """Whether calls on ``device`` weigh dense cuBLAS by what detection found: as
    :func:`weighs_dense_kernels`, except while a CUDA graph is being captured (the host read
    would break the capture)."""
    return weighs_dense_kernels(device) and not capturing_graph(device)


def traced(*tensors: torch.Tensor) -> bool:
    """Whether these tensors are being traced (``torch.compile``, fake or subclassed tensors):
    then PIT's custom operators are what the graph records. Eager calls skip their dispatch:
    it cost ~11 us of host time a call on this project's CPU machine, and on an H100 machine a
    ``detect_micro_tiles`` call through it took 99 us, against ~40 for detection's own work."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def capturing_graph(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (``torch.compile`` with
    ``mode="reduce-overhead"``, ``torch.cuda.graph``): no host reads then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def dense_crossover(plan: PITPlan, A, B, out) -> float:
    """The fraction of listed micro-tiles above which dense cuBLAS finishes before the kernel
    that would compute ``plan`` on these (storage-order) operands.

    About that kernel's throughput on dense input relative to cuBLAS, less the ~5 % detection
    costs, as measured on an H200 (8192^3 float16, ``benchmarks/results/spmm-nvidia-h200.json``,
    "pit_kernel" at 0 % sparsity: whole rows 0.32, 64x64 blocks 0.37, 32x32 0.17, 32x1 0.13;
    4096^3: 1x32 pieces as 16x32 blocks 0.11; the one-thread-per-output kernel 0.0013 in float16).
    Hopper's warpgroup tile (same size, kernel alone on dense input): whole rows 0.79, blocks of
    128 rows 0.67, of 64 rows 0.44, of 32 rows 0.25 (transposed tile), less detection and, for
    rows, zeroing the output. The benchmark's lines through 50 and 100 % (rows) and 10 and 50 %
    (64x64) listed cross cuBLAS at 0.71 and 0.44; through 10 and 50 %, 32x32 at 0.18. On
    Hopper, those of 8192^3 shrink for smaller products (:func:`_room_above_call_floor`).
    """
    facts = _call_facts(A, B, out)
    if warpgroup_knobs(plan, *facts) is not None:
        if plan.accumulate:
            return round(strips_crossover(A.shape[-2], facts[1], facts[2], plan.tile["k"]), 4)
        return round(_warpgroup_crossover(plan) * _room_above_call_floor(A.shape[-2], facts[1], facts[2]), 3)
    path = tensor_core_kernel(plan, *facts)
    if path == "row_gather":
        return 0.30
    if path == "reduce":
        rows, cols = plan.tile["m"], plan.tile["k"]
        if rows >= 64:
            return 0.35
        if rows <= 16:
            return 0.10
        # Column pieces copy A element by element: at 8192^3 their kernel took 1.64 ms at 10 %
        # listed against cuBLAS's 1.31 ms (0.51 ms at 1 %), so it wins below about 8 %.
        return 0.08 if cols < 8 else 0.16
    # The one-thread-per-output kernel: measured with float16 against tensor-core cuBLAS;
    # float32 cuBLAS runs about ten times slower, so PIT keeps ten times the density (derived).
    return 0.01 if A.dtype == torch.float32 else 0.001


def _warpgroup_crossover(plan: PITPlan) -> float:
    """:func:`dense_crossover` of Hopper's warpgroup tile for products as large as 8192^3.

    Blocks of 32 and 64 rows, launched row tiles first (session 13, H100, 8192^3 float16,
    ``spmm.py``'s "pit_kernel" and the tile sweep of ``tile-sweep-launch-order-session13-*``):
    64x64 blocks took 0.78 ms at 20 % listed and ~1.61 at 50 % (tile 1.440 plus the 0.17 of
    detection and launch measured at 10 %), against cuBLAS's 1.36 on the same operand: the
    line crosses at 41 %; 32x32 blocks 0.782 at 10 % and 1.454 at 20 % against 1.30: 18 %;
    32x1 pieces (packed) 0.972 at 10 % and ~1.79 at 20 % (tile 1.625 plus 0.165) against
    1.33: 14 %. Each is kept here over the 0.93 of 8192^3's call floor (:func:`dense_crossover`
    multiplies by it). Blocks of 128 rows keep column tiles first and their earlier crossing.
    """
    if plan.form == "scatter":
        return 0.70
    if plan.tile["k"] % 8 == 0:
        return {128: 0.60, 64: 0.44, 32: 0.19}[plan.tile["m"]]
    # Chunks narrower than 8 columns: packed on 32 rows (0.15, above). Taller blocks gather
    # them element by element in every thread block, not measured so: their crossovers stay
    # at 0.4 of what their blocks' were before session 13 (0.60 and 0.40), the ratio measured
    # on 32 rows before packing (1.51 ms against 0.71 for 32x32 blocks at 10 % listed).
    return {128: 0.24, 64: 0.16, 32: 0.15}[plan.tile["m"]]


# The strips kernel's time (row pieces of k chunks, :mod:`~pit_compiler.schedules.warpgroup_strips`),
# detection and its float32 C's zeroing and cast included: fixed + per output element + per add.
# Fitted to "pit_kernel" of ``benchmarks/spmm.py`` on an H100 (float16; 8192^3, 1x32 pieces at 1,
# 2, 5 and 10 % listed: 0.78, 1.02, 1.71, 3.10 ms; 1x64 at the same: 0.64, 0.79, 1.15, 1.74;
# 4096^3, 1x32 at 1 %: 0.196): L2 adds ~6.7e11 float32 values a second, four per reduction.
STRIPS_FIXED_MS = 0.042
STRIPS_MS_PER_OUTPUT = 7.3e-9  # zeroing C, casting it (float32 C: 12 bytes an element), detection
STRIPS_MS_PER_ADD = 1.49e-9


def strips_crossover(M: int, K: int, N: int, bk: int) -> float:
    """:func:`dense_crossover` of the strips kernel: the share of listed pieces at which its time
    (each listed piece adds ``N`` values to each of its rows: ``share * M * K / bk * N`` adds in
    all) reaches cuBLAS's. At 8192^3: 3.6 % for 1x32 pieces (measured: between 2 and 5 %), 7.3 %
    for 1x64 (between 5 and 10 %); at 4096^3, 0.6 % and 1.2 % (1x32 at 1 % ran 0.196 ms against
    cuBLAS's 0.171, 1x64 0.179 against 0.172); none under about 3850^3."""
    dense_ms = 2 * M * K * N / DENSE_FLOP_PER_MS
    fixed_ms = STRIPS_FIXED_MS + STRIPS_MS_PER_OUTPUT * M * N
    all_listed_ms = STRIPS_MS_PER_ADD * M * -(-K // bk) * N
    return max(0.0, (dense_ms - fixed_ms) / all_listed_ms) if all_listed_ms > 0 else 0.0


# A PIT call on Hopper costs about this much however little is listed (detection, launches,
# host). H100, 4096^3 float16, kernels alone, calls back to back, after the host time per call
# was cut (session 10, scripts/host_breakdown.py): 32x1 at 99 % 0.103-0.107 ms, 64x64 at 90 %
# 0.093-0.099 ms, whole rows at 90 % 0.114-0.155 ms, against cuBLAS's 0.20-0.21. (Before:
# H200, 99 % sparse, 0.15-0.21 ms.)
CALL_FLOOR_MS = 0.10
DENSE_FLOP_PER_MS = 7.5e11  # cuBLAS on an H200, 16-bit, 4096^3 to 8192^3 (0.17-0.23, 1.25-1.58 ms)


def _room_above_call_floor(M: int, K: int, N: int) -> float:
    """The share of a dense product's time left above PIT's per-call floor: the crossovers,
    measured at 8192^3 (where it is 0.93), shrink by it for smaller products, whose cuBLAS time
    nears what a PIT call costs at any density (4096^3: 0.45, where 64x64 blocks at 90 % took
    0.093-0.099 ms against cuBLAS's 0.20 and 32x1 pieces at 90 % 0.19, a tie; none below about
    3350^3)."""
    dense_ms = 2 * M * K * N / DENSE_FLOP_PER_MS
    return max(0.0, 1.0 - CALL_FLOOR_MS / dense_ms) if dense_ms > 0 else 0.0


def below_call_floor(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether dense cuBLAS finishes ``A @ B`` within PIT's per-call floor (:data:`CALL_FLOOR_MS`):
    then PIT loses at any density, and calls that weigh dense kernels run dense without detecting
    (each BERT-base feed-forward product at 4096 tokens is about 26 us of dense work, where one
    PIT call cost about 0.5 ms of host time on an H100 machine, and still 0.1 ms after session
    10). float32 cuBLAS runs about ten times slower than 16-bit (as in :func:`dense_crossover`)."""
    batch = A.shape[0] if A.dim() == 3 else 1
    rate = DENSE_FLOP_PER_MS / (10 if A.dtype == torch.float32 else 1)
    return 2 * batch * A.shape[-2] * A.shape[-1] * B.shape[-1] / rate <= CALL_FLOOR_MS


def dense_product(A, B, out, sparse: str, tile, grid_shape, mask: torch.Tensor | None) -> None:
    """``out = A @ B`` by ``torch.matmul``, the micro-tiles of ``sparse`` that ``mask`` leaves out
    taken as zero (as PIT's kernels take them): exact."""
    if mask is None:
        torch.matmul(A, B, out=out)
        return
    operand = {"A": A, "B": B, "C": out}[sparse]
    listed = listed_micro_tiles(mask, tile, grid_shape)
    whole_rows = sparse == "A" and grid_shape[1] == 1  # A's micro-tiles span all of k
    whole_columns = sparse == "B" and grid_shape[0] == 1
    if whole_rows or whole_columns:  # the product's rows (columns) are zeroed instead
        rows, cols = (operand.shape[-2], 1) if whole_rows else (1, operand.shape[-1])
        torch.matmul(A, B, out=out)
        out.masked_fill_(~expand_micro_tiles(listed, tile, rows, cols), 0)
        return
    keep = expand_micro_tiles(listed, tile, *operand.shape[-2:])
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    if sparse == "A":
        torch.matmul(torch.where(keep, A, zero), B, out=out)
    elif sparse == "B":
        torch.matmul(A, torch.where(keep, B, zero), out=out)
    else:
        torch.matmul(A, B, out=out)
        out.masked_fill_(~keep, 0)


def listed_micro_tiles(mask: torch.Tensor, tile, grid_shape) -> torch.Tensor:
    """The bool micro-tile grid of a mask shaped like the grid or like the operand (a micro-tile
    is listed where any of its elements is non-zero)."""
    listed = mask != 0
    if tuple(listed.shape[-2:]) == tuple(grid_shape):
        return listed
    (rows, cols), (grid_rows, grid_cols) = listed.shape[-2:], grid_shape
    padded = listed.new_zeros((*listed.shape[:-2], grid_rows * tile[0], grid_cols * tile[1]))
    padded[..., :rows, :cols] = listed
    return padded.view(*listed.shape[:-2], grid_rows, tile[0], grid_cols, tile[1]).any(-1).any(-2)


def expand_micro_tiles(grid: torch.Tensor, tile, rows: int, cols: int) -> torch.Tensor:
    """The element mask of a micro-tile grid: every element of a listed micro-tile, tails cut off
    (no copy along an axis of one micro-tile, or of micro-tiles one element long)."""
    for axis, size, step in ((-2, rows, tile[0]), (-1, cols, tile[1])):
        if grid.shape[axis] == 1 or (step == 1 and grid.shape[axis] == size):
            continue
        grid = grid.index_select(axis, torch.arange(size, device=grid.device) // step)
    return grid.expand(*grid.shape[:-2], rows, cols)


def call_signature(plan: PITPlan, A: torch.Tensor, B: torch.Tensor) -> tuple:
    """What calls that may share the fallback's decision have in common: kernel, shapes, dtype, device."""
    return plan.signature(), tuple(A.shape), tuple(B.shape), A.dtype, A.device


# Per call signature: the fallback's counts, read without waiting, copied at most once a millisecond.
RECENT_COUNTS = RecentCounts(post_every_s=1e-3)


def dense_wins(index: MicroTileIndex, crossover: float, call) -> bool:
    """Whether more than ``crossover`` of the index's micro-tile slots are listed.

    Judged by the newest count of an earlier call with the same ``call`` signature that has
    reached the host (:mod:`~pit_compiler.runtime.recent_counts`; a signature's counts are
    copied at most once a millisecond): no wait for the GPU. Only the first call of a signature
    reads its own count back (one sync). Both answers compute the same product, so a stale
    count costs at most speed. Where a call has that count before detecting, :func:`pit_matmul`
    applies :func:`too_dense` to it there (``Route.slots``), to queue its choice ahead of detection.
    """
    if index.indices.numel() == 0:
        return False
    slots = index.indices.shape[-1] * index.counts.numel()
    return too_dense(RECENT_COUNTS.count(call, index.counts), crossover, slots)


def too_dense(listed: int, crossover: float, slots: int) -> bool:
    """The fallback's rule: more than ``crossover`` of an index's ``slots`` micro-tile slots listed."""
    return listed > crossover * slots


def tensor_core_path(plan: PITPlan, A, B, out) -> str | None:
    """The dedicated tensor-core kernel that computes ``plan`` on these (storage-order) operands:
    ``"row_gather"``, ``"reduce"``, ``"strips"`` (row pieces of k chunks, on Hopper), or None where
    the template-scheduled kernel runs. The tuner asks too, so that it times the kernel run time
    will use."""
    return tensor_core_kernel(plan, *_call_facts(A, B, out))


def tensor_core_kernel(plan: PITPlan, ndim: int, K: int, N: int, dtype: str, b_dtype: str, out_dtype: str, target):
    """:func:`tensor_core_path` from what it depends on: the operands' rank, K and N, their TVM
    dtypes and the target (the tuner and the cost model ask before any operand exists)."""
    if warpgroup_knobs(plan, ndim, K, N, dtype, b_dtype, out_dtype, target) is not None:
        return warpgroup_form(plan)[0]
    if _row_gather_fits(plan, ndim, K, N, dtype, b_dtype, out_dtype, target):
        return "row_gather"
    if _reduce_tile_default(plan, ndim, K, N, dtype, b_dtype, out_dtype, target) is not None:
        return "reduce"
    return None


def _reduce_tile_default(plan: PITPlan, ndim, K, N, dtype, b_dtype, out_dtype, target):
    """The reduce tile's default knobs for this call, or None where it does not serve it."""
    if b_dtype != dtype or dtype not in mma_sync_dtypes():
        return None
    return reduce_tile_knobs(plan, ndim, K, N, dtype, out_dtype, target)


def _call_facts(A, B, out) -> tuple:
    """``(ndim, K, N, dtype, b_dtype, out_dtype, target)`` of one call, in :func:`tensor_core_kernel`'s
    order; A stored ``(m, k)``, B stored either way (N is the output's)."""
    dtypes = tvm_dtype(A.dtype, "A"), tvm_dtype(B.dtype, "B"), tvm_dtype(out.dtype, "out")
    return (A.dim(), A.shape[-1], out.shape[-1], *dtypes, target_for(A.device))


def tensor_core_cover(plan: PITPlan, A, B, out) -> PITPlan:
    """``plan``, or where its micro-tile of A has no tensor-core kernel here, the plan of the
    shortest micro-tile a tensor-core tile serves that stacks whole ones of it (1x32 row pieces
    run as 16x32 blocks on ``mma.sync``; bfloat16 1x4 pieces, which that tile does not take, as
    32x4 blocks on Hopper's warpgroup tile, where row pieces of k chunks 8 to 64 wide have their
    own kernel, the strips).

    Exact only for an index detected from A itself: a listed block then carries the zeros
    around A's pieces into the product. It lists more of A than the pieces do (at 90 % of
    1x32 pieces empty, about 81 % of 16x32 blocks hold one), which still runs far faster than
    the one-thread-per-output kernel that would serve the pieces themselves.
    """
    facts = _call_facts(A, B, out)
    stored_mk = plan.contraction.order("a") == ("m", "k")  # the reduce tile reads A so, 2-D
    if plan.sparse != "a" or not stored_mk or tensor_core_kernel(plan, *facts) is not None:
        return plan
    rows, cols = plan.tile["m"], plan.tile["k"]
    sizes = {"m": A.shape[-2], "k": A.shape[-1], "n": out.shape[-1]}
    for height in (h for h in ROW_BLOCKS if h % rows == 0 and h > rows):
        cover = plan_pit(plan.contraction, SparsityAttr("A", (height, cols)), sizes, "reduce")
        if tensor_core_kernel(cover, *facts) == "reduce":
            return cover
    return plan


def run_on_tensor_cores(
    plan: PITPlan, A, B, out, index: MicroTileIndex, knobs=None, facts=None, *, listed=UNREAD, zeroed=False
) -> bool:
    """Run the dedicated tensor-core kernel of :func:`tensor_core_path` (Hopper's warpgroup tile
    first); False where none fits. ``knobs`` (of the tile that serves the call, as the tuner
    measures them) replace the tuned or default ones; ``facts``: :func:`_call_facts` of the
    call, where known. ``listed`` and ``zeroed``: see :func:`run_on_warpgroups`."""
    facts = facts or _call_facts(A, B, out)
    return (
        run_on_warpgroups(plan, A, B, out, index, knobs, facts, listed=listed, zeroed=zeroed)
        or run_row_gather_on_tensor_cores(plan, A, B, out, index, facts)
        or run_reduce_on_tensor_cores(plan, A, B, out, index, knobs, facts)
    )


def run_on_warpgroups(
    plan: PITPlan, A, B, out, index: MicroTileIndex, knobs=None, facts=None, *, listed=UNREAD, zeroed=False
) -> bool:
    """Blocks of 32, 64 or 128 rows (reduce form; with ``pack_a``, A's listed chunks packed
    first) and whole rows of A on Hopper's warpgroup MMA (:mod:`~pit_compiler.codegen.warpgroup`);
    False where it does not serve the call.

    Its knobs: ``knobs`` (the tuner's), else the tile database's best where they fit
    (``pit-tune``), else the defaults. No host sync: each thread block reads its own count
    from the index, so it also runs under CUDA graph capture. ``listed``: the newest count of
    the call's signature, read (and this call's posted) by the caller; by default the tile
    choice reads it itself (:func:`_tile_by_count`). ``zeroed``: ``out`` was zeroed already.
    """
    ndim, K, N, dtype, b_dtype, out_dtype, target = facts = facts or _call_facts(A, B, out)
    default = warpgroup_knobs(plan, *facts)
    if default is None:
        return False
    if knobs is None:
        knobs = _database_knobs(plan, A, B, facts, WarpgroupMatmul())
    if knobs is None:
        knobs = _tile_by_count(plan, A, B, index, default, N, listed)
    knobs = fitting_warpgroup_knobs(default, knobs, plan)
    A, B = _aligned(A), _aligned(B)
    form, shape = warpgroup_form(plan)
    if form == "strips":  # partial sums of several chunks meet in C: added in float32, or 16 bits
        if knobs.adds16 and not (out.dtype == A.dtype and reduced_precision_allowed(out.dtype)):
            knobs = replace(knobs, adds16=False)  # a float32 output, or PyTorch's switch is off
        out_dtype = warpgroup_strips.c_dtype(knobs, dtype)
        c_dtype = getattr(torch, out_dtype)
        C = out if out.dtype == c_dtype and _warpgroup_ready(out) else torch.empty(out.shape, dtype=c_dtype, device=out.device)
    else:
        C = out if _warpgroup_ready(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
    if form == "reduce":
        width = packed_columns(shape[1], K)
        if knobs.pack_a and A.shape[0] * width > MAX_ELEMENTS:  # the packed copy: 32-bit indexing too
            unpacked = WarpgroupMatmul().default(knobs.block_m, narrow_k=True, packed=False)
            # gathered in every thread block, A is read best column tiles first (as the default)
            knobs = unpacked if knobs == default else replace(knobs, pack_a=False, row_tiles_first=unpacked.row_tiles_first)
        if knobs.pack_a:  # the listed chunks of A, packed once for every thread block of a row block
            packed = torch.empty(A.shape[0], width, dtype=A.dtype, device=A.device)
            pack_kernel(*shape, K, dtype, target, kernel_cache())(A, index.counts[0], index.indices[0], packed)
            A = packed
    elif not (zeroed and C is out):
        C.zero_()  # gathered rows: the kernel writes the listed rows only; strips add to C
    if knobs.split_k > 1 and form == "reduce":
        C.zero_()  # the parts of each tile add to it
    kernel = warpgroup_kernel(form, shape, K, N, dtype, out_dtype, target, kernel_cache(), knobs, reads_b_k_major(plan))
    kernel(A, B, index.counts[0], index.indices[0], C)
    if C is not out:
        out.copy_(C)
    return True


# PyTorch's switches for reduced-precision reductions in 16-bit products (torch.backends.cuda.matmul).
REDUCED_PRECISION_FLAGS = {
    torch.float16: "allow_fp16_reduced_precision_reduction",
    torch.bfloat16: "allow_bf16_reduced_precision_reduction",
}


def reduced_precision_allowed(dtype: torch.dtype) -> bool:
    """Whether PyTorch allows reduced-precision reductions in ``dtype`` products
    (``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction`` or ``allow_bf16_...``,
    on by default; False for other types), as it does for cuBLAS's split-k sums: strips set to
    ``adds16`` add their partial sums in 16 bits only then, each add rounded (one per listed
    piece of an output row)."""
    flag = REDUCED_PRECISION_FLAGS.get(dtype)
    return flag is not None and bool(getattr(torch.backends.cuda.matmul, flag))


def zeroes_out_first(plan: PITPlan, out_dtype: torch.dtype) -> bool:
    """Whether the warpgroup kernel of ``plan`` writes into ``out`` (of ``out_dtype``) zeroed
    first: gathered rows write the listed rows alone, and strips add to a float32 C, which is
    ``out`` itself only where it is float32. :func:`pit_matmul` then queues the zeroing ahead of
    detection (``Route.zeroes_output``)."""
    return plan.form == "scatter" and (not plan.accumulate or out_dtype == torch.float32)


_COUNTED_TILES: dict = {}  # call signature -> the tile its newest call outside graph capture ran


def _tile_by_count(plan: PITPlan, A, B, index: MicroTileIndex, default, N: int, listed=UNREAD):
    """The warpgroup tile for what an earlier call listed: gathered rows by their number
    (:func:`row_gather_knobs`); blocks keep ``default``. (32-row blocks of narrow chunks ran
    gathered and 256 wide under 3.2 % listed until session 13; packed and launched row tiles
    first, they are faster at every share measured: on an H100 at 8192^3, tile and pack 0.170
    against 0.322 ms at 1 % and 0.296 against 0.692 at 3 %.)

    The count is the newest of this signature that has reached the host (:data:`RECENT_COUNTS`:
    no wait; the dense fallback's first call reads its own); this call's is posted for the next.
    ``listed``: that count, where the caller read it and posted this call's.
    While a CUDA graph is captured: the tile of the signature's last call before (its kernel
    built then: none is loaded during a capture), and nothing is posted.
    """
    if plan.form == "reduce" or plan.accumulate:  # blocks, strips: one tile whatever the count
        return default
    call = call_signature(plan, A, B)
    if capturing_graph(A.device):
        return _COUNTED_TILES.get(call, default)
    if listed is UNREAD:
        listed = RECENT_COUNTS.latest(call)
        RECENT_COUNTS.post(call, index.counts)
    knobs = row_gather_knobs(default, None if listed is None else listed * plan.tile["m"], N, _sm_count(A.device))
    if len(_COUNTED_TILES) > 4096:  # signatures of shapes long gone
        _COUNTED_TILES.clear()
    _COUNTED_TILES[call] = knobs
    return knobs


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM or H200)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _database_knobs(plan: PITPlan, A, B, facts, template):
    """The tile database's best knobs of ``template`` for this call (``pit-tune``), or None."""
    from pit_compiler.tuning.cost_model import tuned_knobs  # imports this module

    _, _, _, dtype, _, _, target = facts
    return tuned_knobs(plan, dtype, target, A, B, template=template)


def _warpgroup_ready(t: torch.Tensor) -> bool:
    """Whether the warpgroup tile can read or write ``t`` in place: contiguous, from a 16-byte
    aligned address (its copies move 16 bytes at a time)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy the warpgroup tile can read (:func:`_warpgroup_ready`)."""
    return t if _warpgroup_ready(t) else torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


ROW_GATHER_KNOBS = TensorCoreMatmul.Knobs()  # the row-gather tile's only setting


def _row_gather_fits(plan: PITPlan, ndim, K, N, dtype, b_dtype, out_dtype, target) -> bool:
    return (
        plan.form == "scatter"
        and not plan.accumulate
        and plan.sparse == "a"
        and ndim == 2
        and dtype == b_dtype == out_dtype
        and dtype in mma_sync_dtypes()
        and plan.contraction.order("a") == ("m", "k")
        and plan.contraction.order("b") == ("k", "n")
        and fits_tensor_cores(K, N, dtype, target, ROW_GATHER_KNOBS)
    )


def run_row_gather_on_tensor_cores(plan: PITPlan, A, B, out, index: MicroTileIndex, facts=None) -> bool:
    """Whole rows of a 2-D A of a tensor-core dtype on a CUDA GPU: the tensor-core tile; False
    where it does not fit. ``facts``: :func:`_call_facts` of the call, where known.

    Reads the number of listed rows back to the host (one 4-byte sync) to size the launch, so
    the grid covers only the gathered rows; not while a CUDA graph is captured, where that read
    is not allowed (the plain kernel runs then).
    """
    facts = facts or _call_facts(A, B, out)
    if not _row_gather_fits(plan, *facts) or capturing_graph(A.device):
        return False
    _, K, N, dtype, _, _, target = facts
    knobs = ROW_GATHER_KNOBS
    chunks = int(index.counts[0, 0])
    if chunks == 0:
        out.zero_()
        return True
    rows_per_chunk = plan.tile["m"]
    rows = index.indices[0, 0, :chunks].long()
    if rows_per_chunk > 1:
        rows = (rows.view(-1, 1) * rows_per_chunk + torch.arange(rows_per_chunk, device=rows.device)).view(-1)
        rows = rows[rows < A.shape[0]]
    row_blocks = math.ceil(rows.numel() / knobs.block_m)
    idx = torch.zeros(row_blocks * knobs.block_m, dtype=torch.int32, device=A.device)
    idx[: rows.numel()] = rows
    packed = torch.empty(row_blocks * knobs.block_m, N, dtype=torch.float32, device=A.device)
    tile, scatter = row_gather_kernels(K, N, dtype, dtype, target, kernel_cache(), knobs)
    tile(A, B, idx, packed, row_blocks)
    count = torch.full((1,), rows.numel(), dtype=torch.int32, device=A.device)
    scatter(packed, out, count, idx)
    return True


def run_reduce_on_tensor_cores(plan: PITPlan, A, B, out, index: MicroTileIndex, knobs=None, facts=None) -> bool:
    """Column pieces and blocks of a 2-D A of a tensor-core dtype, reduce form, on a CUDA GPU: the
    tensor-core tile; False where it does not fit (see
    :func:`~pit_compiler.codegen.reduce_matmul.reduce_tile_knobs`). ``facts``: as for the row gather.

    Its knobs: ``knobs``, else the tile database's best for this kernel where they fit (``pit-tune``),
    else the defaults. No host sync: each thread block reads its own row block's count. The tile
    writes whole row blocks, so an M that is not a multiple of the micro-tile's rows goes through
    a padded copy.
    """
    ndim, K, N, dtype, b_dtype, out_dtype, target = facts = facts or _call_facts(A, B, out)
    default = _reduce_tile_default(plan, *facts)
    if default is None:
        return False
    if knobs is None:
        knobs = fitting_knobs(default, _database_knobs(plan, A, B, facts, TensorCoreMatmul()), N)
    bm, bk = plan.tile["m"], plan.tile["k"]
    row_blocks = index.counts.shape[-1]
    direct = out.is_contiguous() and row_blocks * bm == out.shape[0]
    C = out if direct else torch.empty(row_blocks * bm, N, dtype=out.dtype, device=out.device)
    kernel = reduce_tile_kernel(K, N, bm, bk, out_dtype, target, kernel_cache(), knobs, dtype)
    kernel(A, B, index.counts[0], index.indices[0], C.view(row_blocks, bm, N))
    if C is not out:
        out.copy_(C[: out.shape[0]])
    return True
